import Foundation
import Glibc
import Testing
import Userfaultfd

/// UFFDIO_REGISTER and UFFDIO_UNREGISTER on real memory.
@Suite("Registration")
struct RegistrationTests {
    @Test("MISSING on anonymous memory returns the resolving ioctls, without write-protect and continue")
    func registerMissing() throws {
        let uffd = try UserfaultFD(requiredFeatures: [.poison, .move])
        defer { uffd.close() }
        let mapping = try TestMapping(pages: 4)
        defer { mapping.unmap() }
        let ioctls = try uffd.register(mapping.range, mode: .missing)
        #expect(ioctls.isSuperset(of: [.wake, .copy, .zeroPage, .move, .poison]), "\(ioctls)")
        #expect(!ioctls.contains(.writeProtect))
        #expect(!ioctls.contains(.continue))
        // The kernel's own answer for anonymous MISSING (see the notes): 0x13c.
        #expect(ioctls.rawValue == 0x13c)
    }

    @Test("WRITEPROTECT on anonymous memory returns writeProtect and wake")
    func registerWriteProtect() throws {
        let uffd = try UserfaultFD(requiredFeatures: .pagefaultFlagWP)
        defer { uffd.close() }
        let mapping = try TestMapping(pages: 2)
        defer { mapping.unmap() }
        let ioctls = try uffd.register(mapping.range, mode: .writeProtect)
        #expect(ioctls.isSuperset(of: [.writeProtect, .wake]), "\(ioctls)")
        #expect(!ioctls.contains(.continue))
    }

    @Test("MISSING|WRITEPROTECT returns the union")
    func registerMissingAndWriteProtect() throws {
        let uffd = try UserfaultFD(requiredFeatures: .pagefaultFlagWP)
        defer { uffd.close() }
        let mapping = try TestMapping(pages: 2)
        defer { mapping.unmap() }
        let ioctls = try uffd.register(mapping.range, mode: [.missing, .writeProtect])
        #expect(ioctls.isSuperset(of: [.copy, .zeroPage, .wake, .writeProtect]), "\(ioctls)")
        #expect(!ioctls.contains(.continue))
    }

    @Test("MINOR on shmem returns continue")
    func registerMinorShmem() throws {
        let scope = FaultScope()
        defer { scope.finishWithoutWatchdog() }
        let uffd = scope.track(try UserfaultFD(requiredFeatures: .minorShmem))
        let memfd = try SharedMemfd(pages: 2, scope: scope)
        let ioctls = try uffd.register(memfd.second.range, mode: .minor)
        #expect(ioctls.isSuperset(of: [.continue, .wake]), "\(ioctls)")
    }

    @Test("MINOR on anonymous memory is an invalid argument")
    func minorOnAnonymous() throws {
        let uffd = try UserfaultFD(requiredFeatures: .minorShmem)
        defer { uffd.close() }
        let mapping = try TestMapping(pages: 1)
        defer { mapping.unmap() }
        let error = expectUserfaultError(.invalidArgument) { () throws(UserfaultError) in
            try uffd.register(mapping.range, mode: .minor)
        }
        #expect(error?.errno == EINVAL, "the kernel refused it")
        #expect(error?.operation == .register)
        #expect(error?.range == mapping.range)
    }

    @Test("An empty mode is rejected before the kernel sees it")
    func emptyMode() throws {
        let uffd = try UserfaultFD()
        defer { uffd.close() }
        let mapping = try TestMapping(pages: 1)
        defer { mapping.unmap() }
        let error = expectUserfaultError(.invalidArgument) { () throws(UserfaultError) in
            try uffd.register(mapping.range, mode: [])
        }
        #expect(error?.errno == nil)
    }

    @Test("Registering unmapped memory throws a typed error")
    func registerUnmapped() throws {
        let uffd = try UserfaultFD()
        defer { uffd.close() }
        // Memory freed by munmap could be mapped again at once by a test running in parallel, so use addresses nothing
        // maps: the lowest mappable pages (vm.mmap_min_addr is 64 KiB), checked against /proc/self/maps.
        let range = MemoryRange(start: 0x10000, length: 2 * uffd.pageSize)
        let maps = try String(contentsOfFile: "/proc/self/maps", encoding: .utf8)
        let mapped = maps.split(separator: "\n").compactMap { line -> MemoryRange? in
            let bounds = line.split(separator: " ")[0].split(separator: "-").compactMap { UInt($0, radix: 16) }
            return bounds.count == 2 ? MemoryRange(start: bounds[0], end: bounds[1]) : nil
        }
        #expect(!mapped.isEmpty)
        try #require(!mapped.contains { $0.overlaps(range) }, "the probe range is mapped")
        let error = expectUserfaultError(.invalidArgument) { () throws(UserfaultError) in
            try uffd.register(range, mode: .missing)
        }
        #expect(error?.errno == EINVAL)
        #expect(error?.range == range)
    }

    @Test("A range owned by another userfaultfd is busy")
    func registerTwiceWithTwoUffds() throws {
        let first = try UserfaultFD()
        let second = try UserfaultFD()
        defer { first.close(); second.close() }
        let mapping = try TestMapping(pages: 3)
        defer { mapping.unmap() }
        try first.register(mapping.pages(0, count: 2), mode: .missing)
        let error = expectUserfaultError(.busy) { () throws(UserfaultError) in
            try second.register(mapping.range, mode: .missing)
        }
        #expect(error?.errno == EBUSY)
        // The page the first did not take is free for the second.
        try second.register(mapping.pages(2), mode: .missing)
        // Registering again with the same userfaultfd is allowed.
        try first.register(mapping.pages(0, count: 2), mode: .missing)
    }

    @Test(.timeLimit(.minutes(1)))
    func unregisterWakesBlockedFaultAndMemoryBecomesOrdinary() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD()
            let mapping = try scope.makeMapping(pages: 2)
            try uffd.register(mapping.range, mode: .missing)
            let reader = readOnThread(mapping.page(1) + 100)
            var events = uffd.events.makeAsyncIterator()
            let fault = try await nextPageFault(&events)
            #expect(fault.pageAddress == mapping.page(1))
            #expect(!reader.isFinished, "the reader waits for the fault to be resolved")

            try uffd.unregister(mapping.range)
            // Woken, the reader retries as ordinary anonymous memory: zeros.
            #expect(await reader.value == 0)
            // Ordinary memory now: writes and reads need no handler.
            let writer = writeOnThread(mapping.page(0) + 1, 0x77)
            #expect(await writer.finishes(within: 10))
            #expect(peek(mapping.page(0) + 1) == 0x77)
            // And the userfaultfd no longer owns the range: copy finds nothing registered.
            var source = sourcePage(1)
            expectUserfaultError(.notRegistered) { () throws(UserfaultError) in
                try uffd.copy(from: &source, to: mapping.page(1), length: uffd.pageSize)
            }
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func unregisterClearsWriteProtection() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD(required: .pagefaultFlagWP)
            let mapping = try scope.makeMapping(pages: 1)
            mapping.fill(page: 0, with: 1)
            try uffd.register(mapping.range, mode: .writeProtect)
            try uffd.writeProtect(mapping.range, enabled: true)
            try uffd.unregister(mapping.range)
            let writer = writeOnThread(mapping.address, 2)
            #expect(await writer.finishes(within: 10), "no write-protect fault after unregistering")
            #expect(peek(mapping.address) == 2)
        }
    }
}
