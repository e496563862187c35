import CUserfaultfd
import Glibc
import Testing
import Userfaultfd

/// Creation, the UFFDIO_API handshake and adoption of descriptors.
@Suite("Handshake and creation")
struct HandshakeTests {
    @Test("The default handshake enables nothing and reports what the kernel offers")
    func defaultHandshake() throws {
        let uffd = try UserfaultFD()
        defer { uffd.close() }
        let probe = try UserfaultFD.probeFeatures()
        #expect(uffd.enabledFeatures.isEmpty)
        #expect(uffd.availableFeatures == probe.features)
        // This machine's kernel (6.18) offers every feature the library knows.
        #expect(uffd.availableFeatures.isSuperset(of: .allKnown), "offered \(uffd.availableFeatures)")
        #expect(uffd.supportedIoctls.isSuperset(of: [.register, .unregister, .api]), "\(uffd.supportedIoctls)")
        #expect(uffd.fileDescriptor >= 0)
        #expect(uffd.pageSize == Int(sysconf(Int32(_SC_PAGESIZE))))
        #expect(!uffd.isClosed)
    }

    @Test("Required features are enabled, and only those")
    func requiredFeaturesEnabled() throws {
        let wanted: UserfaultFeatures = [.threadID, .exactAddress, .pagefaultFlagWP, .eventRemove]
        let uffd = try UserfaultFD(requiredFeatures: wanted)
        defer { uffd.close() }
        #expect(uffd.enabledFeatures == wanted)
        #expect(uffd.availableFeatures.isSuperset(of: wanted))
    }

    @Test("A required feature the kernel lacks throws unsupportedFeatures naming the bit")
    func missingRequiredFeature() throws {
        let bit40 = UserfaultFeatures(rawValue: 1 << 40)
        let error = expectUserfaultError(.unsupportedFeatures(bit40)) { () throws(UserfaultError) in
            try UserfaultFD(requiredFeatures: [bit40, .threadID])
        }
        #expect(error?.operation == .handshake)
        let description = error.map { String(describing: $0) } ?? ""
        #expect(description.contains("bit 40"), "\(description)")
        // Together with optional features the kernel is probed first; the answer is the same.
        let withOptional = expectUserfaultError(.unsupportedFeatures(bit40)) { () throws(UserfaultError) in
            try UserfaultFD(requiredFeatures: bit40, optionalFeatures: .threadID)
        }
        #expect(withOptional.map { String(describing: $0) }?.contains("bit 40") == true)
    }

    @Test("An optional feature the kernel lacks is left out; the known ones are enabled")
    func optionalUnknownFeature() throws {
        let bit40 = UserfaultFeatures(rawValue: 1 << 40)
        let uffd = try UserfaultFD(optionalFeatures: [bit40, .threadID, .exactAddress])
        defer { uffd.close() }
        #expect(!uffd.enabledFeatures.contains(bit40))
        #expect(uffd.enabledFeatures == [.threadID, .exactAddress])
    }

    @Test("Feature names: known by kernel name, unknown as 'bit N'")
    func featureNames() {
        let features: UserfaultFeatures = [.eventFork, .move, UserfaultFeatures(rawValue: 1 << 40)]
        #expect(features.names == ["EVENT_FORK", "MOVE", "bit 40"])
        #expect(features.description == "[EVENT_FORK, MOVE, bit 40]")
        #expect(UserfaultFeatures.allKnown.rawValue == 0x1ffff)
    }

    @Test("Every creation path produces a working userfaultfd", arguments: [
        UserfaultFD.CreationPath.automatic, .systemCall, .device,
    ])
    func creationPaths(path: UserfaultFD.CreationPath) throws {
        let uffd = try UserfaultFD(requiredFeatures: .threadID, path: path)
        defer { uffd.close() }
        #expect(uffd.enabledFeatures == .threadID)
        try UserfaultFD.validateUserfaultfd(uffd.fileDescriptor)
        // The descriptor is usable: register and resolve a page without any thread faulting.
        let mapping = try TestMapping(pages: 1)
        defer { mapping.unmap() }
        let ioctls = try uffd.register(mapping.range, mode: .missing)
        #expect(ioctls.contains(.copy))
        var source = sourcePage(0x42)
        try uffd.copy(from: &source, to: mapping.address, length: uffd.pageSize)
        #expect(mapping.bytes(page: 0) == source)
        // Non-blocking and close-on-exec, as created.
        let flags = cuffd_get_status_flags(uffd.fileDescriptor)
        #expect(flags & O_NONBLOCK != 0)
        #expect(fcntl(uffd.fileDescriptor, F_GETFD) & FD_CLOEXEC != 0)
    }

    @Test("probeFeatures through /dev/userfaultfd agrees with the system call")
    func probePaths() throws {
        let viaSyscall = try UserfaultFD.probeFeatures(path: .systemCall)
        let viaDevice = try UserfaultFD.probeFeatures(path: .device)
        #expect(viaSyscall.features == viaDevice.features)
        #expect(viaSyscall.ioctls == viaDevice.ioctls)
        #expect(viaSyscall.ioctls.isSuperset(of: [.register, .unregister, .api]))
    }

    @Test("Adopting a descriptor that is not a userfaultfd throws notUserfaultfd")
    func adoptPipe() throws {
        var fds: [Int32] = [-1, -1]
        #expect(pipe(&fds) == 0)
        defer { Glibc.close(fds[0]); Glibc.close(fds[1]) }
        expectUserfaultError(.notUserfaultfd) { () throws(UserfaultError) in try UserfaultFD(adopting: fds[0]) }
        // The pipe was not taken over: it is still open.
        #expect(fcntl(fds[0], F_GETFD) >= 0)
        // A descriptor that is not open at all. Not a number just closed: in the parallel suite another test may get
        // that number at once (once it was another test's userfaultfd, adopted here). No process has descriptor
        // Int32.max (fs.nr_open cannot exceed 2^30).
        let neverOpen = Int32.max
        let error = expectUserfaultError(.notUserfaultfd) { () throws(UserfaultError) in try UserfaultFD(adopting: neverOpen) }
        #expect(error?.operation == .adopt)
    }

    @Test(.timeLimit(.minutes(1)))
    func adoptDuplicatedUserfaultfd() async throws {
        try await withFaultWatchdog { scope in
            let original = try scope.makeUFFD(required: .threadID)
            let duplicate = dup(original.fileDescriptor)
            #expect(duplicate >= 0)
            let adopted = scope.track(try UserfaultFD(adopting: duplicate, enabledFeatures: original.enabledFeatures))
            #expect(adopted.fileDescriptor == duplicate)
            #expect(adopted.enabledFeatures == .threadID)
            #expect(cuffd_get_status_flags(duplicate) & O_NONBLOCK != 0)
            // Close the original: the adopted descriptor keeps the userfaultfd alive and fully usable.
            original.close()

            let mapping = try scope.makeMapping(pages: 1)
            try adopted.register(mapping.range, mode: .missing)
            let reader = readOnThread(mapping.address + 7)
            var events = adopted.events.makeAsyncIterator()
            let fault = try await nextPageFault(&events)
            #expect(fault.pageAddress == mapping.address)
            #expect(fault.kind == .missing)
            #expect(fault.threadID != nil)  // read with the adopted features
            var source = sourcePage(0x5c)
            try adopted.copy(from: &source, to: fault.pageAddress, length: adopted.pageSize)
            #expect(await reader.value == 0x5c)
        }
    }

    @Test("Adopting a fresh descriptor whose handshake was done in C")
    func adoptRawDescriptor() throws {
        let fd = cuffd_userfaultfd(O_CLOEXEC)
        #expect(fd >= 0)
        var api = cuffd_api(api: CUFFD_API, features: 0, ioctls: 0)
        #expect(cuffd_ioctl_api(fd, &api) == 0)
        let adopted = try UserfaultFD(adopting: fd)
        #expect(cuffd_get_status_flags(fd) & O_NONBLOCK != 0, "adoption makes the descriptor non-blocking")
        let mapping = try TestMapping(pages: 2)
        defer { mapping.unmap() }
        try adopted.register(mapping.range, mode: .missing)
        try adopted.zeroPage(mapping.pages(1))
        #expect(peek(mapping.page(1)) == 0)
        adopted.close()
        #expect(adopted.isClosed)
        expectUserfaultError(.closed) { () throws(UserfaultError) in try adopted.zeroPage(mapping.pages(0)) }
    }
}
