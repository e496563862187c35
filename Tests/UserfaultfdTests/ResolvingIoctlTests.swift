import CUserfaultfdTestSupport
import Glibc
import Testing
import Userfaultfd

/// Every resolving ioctl, for real, with the content of the memory checked afterwards.
@Suite("Resolving ioctls")
struct ResolvingIoctlTests {
    @Test(.timeLimit(.minutes(1)))
    func copyResolvesAFault() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD()
            let mapping = try scope.makeMapping(pages: 3)
            try uffd.register(mapping.range, mode: .missing)
            let reader = readOnThread(mapping.page(1) + 0xabc)
            var events = uffd.events.makeAsyncIterator()
            let fault = try await nextPageFault(&events)
            #expect(fault.pageAddress == mapping.page(1))
            #expect(fault.kind == .missing)
            #expect(!fault.isWrite)
            // A source with a distinct byte at every offset, so a misplaced copy would show.
            var source = (0..<uffd.pageSize).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
            let copied = try uffd.copy(from: &source, to: fault.pageAddress, length: uffd.pageSize)
            #expect(copied == uffd.pageSize)
            #expect(await reader.value == source[0xabc])
            #expect(mapping.bytes(page: 1) == source)
            // A second copy to the same page: EEXIST, as its own error case.
            let error = expectUserfaultError(.pageExists) { () throws(UserfaultError) in
                try uffd.copy(from: &source, to: fault.pageAddress, length: uffd.pageSize)
            }
            #expect(error?.errno == EEXIST)
            #expect(error?.operation == .copy)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func copyWithUnalignedSourceAndSeveralPages() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD()
            let mapping = try scope.makeMapping(pages: 3)
            try uffd.register(mapping.range, mode: .missing)
            // Source need not be aligned: copy from offset 1 of a larger buffer.
            let source = (0..<(3 * uffd.pageSize + 1)).map { UInt8(truncatingIfNeeded: $0 / 3) }
            try source.withUnsafeBytes { buffer in
                let copied = try uffd.copy(from: buffer.baseAddress! + 1, to: mapping.address, length: 3 * uffd.pageSize)
                #expect(copied == 3 * uffd.pageSize)
            }
            let expected = Array(source[1...])
            let actual = (0..<3).flatMap { mapping.bytes(page: $0) }
            #expect(actual == expected)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func copyDontWakeThenWake() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD()
            let mapping = try scope.makeMapping(pages: 1)
            try uffd.register(mapping.range, mode: .missing)
            let reader = readOnThread(mapping.address + 9)
            var events = uffd.events.makeAsyncIterator()
            let fault = try await nextPageFault(&events)
            var source = sourcePage(0x3e)
            try uffd.copy(from: &source, to: fault.pageAddress, length: uffd.pageSize, mode: .dontWake)
            // The page is in place, but the reader was not woken.
            #expect(mapping.bytes(page: 0) == source)
            #expect(await reader.finishes(within: 0.3) == false, "dontWake must leave the reader asleep")
            try uffd.wake(mapping.range)
            #expect(await reader.value == 0x3e)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func copyWriteProtectedThenWriteFaults() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD(required: .pagefaultFlagWP)
            let mapping = try scope.makeMapping(pages: 1)
            try uffd.register(mapping.range, mode: [.missing, .writeProtect])
            var source = sourcePage(0x11)
            try uffd.copy(from: &source, to: mapping.address, length: uffd.pageSize, mode: .writeProtect)
            // Reads are fine ...
            #expect(peek(mapping.address + 5) == 0x11)
            // ... a write is a write-protect fault.
            let writer = writeOnThread(mapping.address + 5, 0x99)
            var events = uffd.events.makeAsyncIterator()
            let fault = try await nextPageFault(&events)
            #expect(fault.kind == .writeProtect)
            #expect(fault.isWrite)
            #expect(fault.pageAddress == mapping.address)
            #expect(!writer.isFinished)
            try uffd.writeProtect(mapping.range, enabled: false)
            #expect(await writer.finishes(within: 10))
            #expect(peek(mapping.address + 5) == 0x99)
            #expect(peek(mapping.address + 4) == 0x11)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func zeroPageReadsZeroAndTwiceIsPageExists() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD()
            let mapping = try scope.makeMapping(pages: 2)
            try uffd.register(mapping.range, mode: .missing)
            let reader = readOnThread(mapping.page(1) + 77)
            var events = uffd.events.makeAsyncIterator()
            let fault = try await nextPageFault(&events)
            #expect(fault.pageAddress == mapping.page(1))
            let mapped = try uffd.zeroPage(mapping.pages(1))
            #expect(mapped == uffd.pageSize)
            #expect(await reader.value == 0)
            #expect(mapping.bytes(page: 1).allSatisfy { $0 == 0 })
            let error = expectUserfaultError(.pageExists) { () throws(UserfaultError) in
                try uffd.zeroPage(mapping.pages(1))
            }
            #expect(error?.errno == EEXIST)
            #expect(error?.operation == .zeroPage)
            // zeroPage(wake: false) then wake.
            let second = readOnThread(mapping.page(0))
            let fault0 = try await nextPageFault(&events)
            #expect(fault0.pageAddress == mapping.page(0))
            try uffd.zeroPage(mapping.pages(0), wake: false)
            #expect(await second.finishes(within: 0.3) == false)
            try uffd.wake(mapping.pages(0))
            #expect(await second.value == 0)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func writeProtectOnAndOff() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD(required: .pagefaultFlagWP)
            let mapping = try scope.makeMapping(pages: 2)
            mapping.fill(page: 0, with: 0xa0)
            mapping.fill(page: 1, with: 0xa1)
            try uffd.register(mapping.range, mode: .writeProtect)
            try uffd.writeProtect(mapping.range, enabled: true)
            let writer = writeOnThread(mapping.page(1) + 3, 0x5a)
            var events = uffd.events.makeAsyncIterator()
            let fault = try await nextPageFault(&events)
            #expect(fault.kind == .writeProtect)
            #expect(fault.isWrite)
            #expect(fault.pageAddress == mapping.page(1))
            #expect(!writer.isFinished)
            #expect(peek(mapping.page(1) + 3) == 0xa1, "the write has not landed while protected")
            // Resolve: un-protect only the faulting page.
            try uffd.writeProtect(mapping.pages(1), enabled: false)
            #expect(await writer.finishes(within: 10))
            #expect(peek(mapping.page(1) + 3) == 0x5a)
            // Page 0 is still protected: a write to it faults too.
            let writer0 = writeOnThread(mapping.page(0), 0x01)
            let fault0 = try await nextPageFault(&events)
            #expect(fault0.kind == .writeProtect)
            #expect(fault0.pageAddress == mapping.page(0))
            // Un-protect without waking, then wake.
            try uffd.writeProtect(mapping.pages(0), enabled: false, wake: false)
            #expect(await writer0.finishes(within: 0.3) == false)
            try uffd.wake(mapping.pages(0))
            #expect(await writer0.finishes(within: 10))
            #expect(peek(mapping.page(0)) == 0x01)
            #expect(peek(mapping.page(0) + 1) == 0xa0)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func continueMapsPageCachePages() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD(required: .minorShmem)
            let memfd = try SharedMemfd(pages: 2, scope: scope)
            try uffd.register(memfd.second.range, mode: .minor)
            // Fill the page cache through the unregistered alias.
            memfd.first.fill(page: 0, with: 0xc3)
            let reader = readOnThread(memfd.second.page(0) + 11)
            var events = uffd.events.makeAsyncIterator()
            let fault = try await nextPageFault(&events)
            #expect(fault.kind == .minor)
            #expect(!fault.isWrite)
            #expect(fault.pageAddress == memfd.second.page(0))
            #expect(!reader.isFinished)
            let mapped = try uffd.continue(memfd.second.pages(0))
            #expect(mapped == uffd.pageSize)
            #expect(await reader.value == 0xc3)
            #expect(memfd.second.bytes(page: 0).allSatisfy { $0 == 0xc3 })
            let again = expectUserfaultError(.pageExists) { () throws(UserfaultError) in
                try uffd.continue(memfd.second.pages(0))
            }
            #expect(again?.errno == EEXIST)
            #expect(again?.operation == .continue)
            // Page 1 has no page in the page cache: nothing to map.
            let missing = expectUserfaultError(.badAddress) { () throws(UserfaultError) in
                try uffd.continue(memfd.second.pages(1))
            }
            #expect(missing?.errno == EFAULT)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func poisonRaisesSIGBUS() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD(required: .poison)
            let mapping = try scope.makeMapping(pages: 3)
            try uffd.register(mapping.range, mode: .missing)

            // Page 1: poisoned ahead of any access.
            let poisoned = try uffd.poison(mapping.pages(1))
            #expect(poisoned == uffd.pageSize)
            let probe = OffPoolThread { () -> (signal: Int32, code: Int32, byte: UInt8) in
                var byte: UInt8 = 0
                let signal = cuffd_test_probe_read(UnsafeRawPointer(bitPattern: mapping.page(1) + 8), &byte)
                return (signal, cuffd_test_last_probe_code(), byte)
            }
            let result = await probe.value
            #expect(result.signal == SIGBUS)
            #expect(result.code == cuffd_test_bus_adrerr())
            // Poisoning a present (poisoned) page again: EEXIST.
            expectUserfaultError(.pageExists) { () throws(UserfaultError) in try uffd.poison(mapping.pages(1)) }

            // Page 0: a blocked reader is woken by the poison and takes the SIGBUS.
            let blocked = OffPoolThread { () -> Int32 in
                var byte: UInt8 = 0
                return cuffd_test_probe_read(UnsafeRawPointer(bitPattern: mapping.page(0)), &byte)
            }
            var events = uffd.events.makeAsyncIterator()
            let fault = try await nextPageFault(&events)
            #expect(fault.pageAddress == mapping.page(0))
            try uffd.poison(mapping.pages(0))
            #expect(await blocked.value == SIGBUS)

            // Page 2: copied normally; the probe reads it without a signal.
            var source = sourcePage(0x4d)
            try uffd.copy(from: &source, to: mapping.page(2), length: uffd.pageSize)
            let fine = OffPoolThread { () -> (Int32, UInt8) in
                var byte: UInt8 = 0
                let signal = cuffd_test_probe_read(UnsafeRawPointer(bitPattern: mapping.page(2)), &byte)
                return (signal, byte)
            }
            let (signal, byte) = await fine.value
            #expect(signal == 0)
            #expect(byte == 0x4d)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func moveMovesPagesAndEmptiesTheSource() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD(required: .move)
            let source = try scope.makeMapping(pages: 2)
            // A fork elsewhere in the test process would share the source pages (MOVE then says EBUSY).
            #expect(madvise(source.pointer, source.length, MADV_DONTFORK) == 0)
            source.fill(page: 0, with: 0x61)
            source.fill(page: 1, with: 0x62)
            let destination = try scope.makeMapping(pages: 2)
            try uffd.register(destination.range, mode: .missing)

            let reader = readOnThread(destination.page(1) + 40)
            var events = uffd.events.makeAsyncIterator()
            let fault = try await nextPageFault(&events)
            #expect(fault.pageAddress == destination.page(1))
            let moved = try uffd.move(from: source.address, to: destination.address, length: 2 * uffd.pageSize)
            #expect(moved == 2 * uffd.pageSize)
            #expect(await reader.value == 0x62)
            #expect(destination.bytes(page: 0).allSatisfy { $0 == 0x61 })
            #expect(destination.bytes(page: 1).allSatisfy { $0 == 0x62 })
            // The source is empty now: ordinary anonymous memory reads back zeros.
            #expect(source.bytes(page: 0).allSatisfy { $0 == 0 })
            #expect(source.bytes(page: 1).allSatisfy { $0 == 0 })
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func moveWithSourceHoles() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD(required: .move)
            let source = try scope.makeMapping(pages: 2)
            #expect(madvise(source.pointer, source.length, MADV_DONTFORK) == 0)
            let destination = try scope.makeMapping(pages: 2)
            try uffd.register(destination.range, mode: .missing)

            // Only page 0 of the source is populated. Without the flag, a hole is an error ...
            source.fill(page: 0, with: 0x70)
            expectUserfaultError(.notRegistered) { () throws(UserfaultError) in
                try uffd.move(from: source.page(1), to: destination.page(1), length: uffd.pageSize)
            }
            // ... with it, the hole is skipped and its destination page stays missing.
            let moved = try uffd.move(
                from: source.address, to: destination.address, length: 2 * uffd.pageSize, mode: .allowSourceHoles)
            #expect(moved == 2 * uffd.pageSize)
            #expect(destination.bytes(page: 0).allSatisfy { $0 == 0x70 })
            // Destination page 1 is still missing: a zero page can be placed there (EEXIST if it were present).
            try uffd.zeroPage(destination.pages(1))
            #expect(peek(destination.page(1)) == 0)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func partialCopyReportsBytesCompleted() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD()
            let mapping = try scope.makeMapping(pages: 3)
            try uffd.register(mapping.range, mode: .missing)
            // The middle page is present.
            try uffd.zeroPage(mapping.pages(1))
            var source = (0..<(3 * uffd.pageSize)).map { UInt8(truncatingIfNeeded: $0 / uffd.pageSize + 1) }
            let error = expectUserfaultError { () throws(UserfaultError) in
                try uffd.copy(from: &source, to: mapping.address, length: 3 * uffd.pageSize)
            }
            #expect(error?.code == .tryAgain(bytesCompleted: 4096))
            #expect(error?.code == .tryAgain(bytesCompleted: uffd.pageSize))
            #expect(error?.errno == EAGAIN)
            // The first page was copied, the middle one untouched, the last still missing.
            #expect(mapping.bytes(page: 0).allSatisfy { $0 == 1 })
            #expect(mapping.bytes(page: 1).allSatisfy { $0 == 0 })
            try source.withUnsafeBytes { buffer in
                let copied = try uffd.copy(from: buffer.baseAddress! + 2 * uffd.pageSize, to: mapping.page(2), length: uffd.pageSize)
                #expect(copied == uffd.pageSize)
            }
            #expect(mapping.bytes(page: 2).allSatisfy { $0 == 3 })
        }
    }

    @Test("Copy from an unreadable source is badAddress; to unregistered memory notRegistered")
    func copyErrors() throws {
        let uffd = try UserfaultFD()
        defer { uffd.close() }
        let mapping = try TestMapping(pages: 2)
        defer { mapping.unmap() }
        try uffd.register(mapping.pages(0), mode: .missing)
        let unreadable = try TestMapping(length: uffd.pageSize, prot: PROT_NONE, flags: MAP_PRIVATE | MAP_ANONYMOUS, fd: -1)
        defer { unreadable.unmap() }
        let bad = expectUserfaultError(.badAddress) { () throws(UserfaultError) in
            try uffd.copy(from: unreadable.pointer, to: mapping.page(0), length: uffd.pageSize)
        }
        #expect(bad?.errno == EFAULT)
        var source = sourcePage(1)
        let unregistered = expectUserfaultError(.notRegistered) { () throws(UserfaultError) in
            try uffd.copy(from: &source, to: mapping.page(1), length: uffd.pageSize)
        }
        #expect(unregistered?.errno == ENOENT)
        // Crossing the end of the registered range.
        expectUserfaultError(.notRegistered) { () throws(UserfaultError) in
            try uffd.copy(from: &source, to: mapping.page(0), length: 2 * uffd.pageSize)
        }
    }
}
