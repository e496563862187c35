import Glibc
import Testing
import Userfaultfd

/// Typed errors: closed descriptors, ranges rejected before the kernel sees them, errno mapping, descriptions.
@Suite("Errors")
struct ErrorTests {
    /// Every range-taking operation, applied to `range`.
    static func operations(_ uffd: UserfaultFD, source: UnsafeRawPointer)
        -> [(UserfaultError.Operation, (MemoryRange) throws(UserfaultError) -> Void)]
    {
        [
            (.register, { range throws(UserfaultError) in try uffd.register(range, mode: .missing) }),
            (.unregister, { range throws(UserfaultError) in try uffd.unregister(range) }),
            (.wake, { range throws(UserfaultError) in try uffd.wake(range) }),
            (.copy, { range throws(UserfaultError) in try uffd.copy(from: source, to: range.start, length: range.length) }),
            (.zeroPage, { range throws(UserfaultError) in try uffd.zeroPage(range) }),
            (.writeProtect, { range throws(UserfaultError) in try uffd.writeProtect(range, enabled: true) }),
            (.continue, { range throws(UserfaultError) in try uffd.continue(range) }),
            (.poison, { range throws(UserfaultError) in try uffd.poison(range) }),
            (.move, { range throws(UserfaultError) in
                try uffd.move(from: range.start, to: range.start, length: range.length) }),
        ]
    }

    @Test("Every call after close() throws closed")
    func callsAfterClose() throws {
        let uffd = try UserfaultFD(requiredFeatures: [.pagefaultFlagWP, .move, .poison])
        let mapping = try TestMapping(pages: 1)
        defer { mapping.unmap() }
        try uffd.register(mapping.range, mode: [.missing, .writeProtect])
        #expect(!uffd.isClosed)
        uffd.close()
        #expect(uffd.isClosed)
        uffd.close()  // again: nothing happens
        #expect(uffd.isClosed)
        let source = sourcePage(1)
        source.withUnsafeBytes { buffer in
            for (operation, call) in Self.operations(uffd, source: buffer.baseAddress!) {
                let error = expectUserfaultError(.closed) { () throws(UserfaultError) in try call(mapping.range) }
                #expect(error?.operation == operation)
                #expect(error?.errno == nil, "\(operation) never reached the kernel")
            }
        }
    }

    @Test("Closing wakes a blocked reader, which then reads ordinary (zero) memory", .timeLimit(.minutes(1)))
    func closeWakesBlockedThreads() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD()
            let mapping = try scope.makeMapping(pages: 2)
            try uffd.register(mapping.range, mode: .missing)
            let readers = [readOnThread(mapping.page(0)), readOnThread(mapping.page(1) + 1)]
            var events = uffd.events.makeAsyncIterator()
            _ = try await nextPageFault(&events)
            _ = try await nextPageFault(&events)
            #expect(!readers[0].isFinished && !readers[1].isFinished)
            uffd.close()
            for reader in readers {
                #expect(await reader.finishes(within: 10))
                #expect(await reader.value == 0)
            }
        }
    }

    @Test("Unaligned or empty ranges are invalidArgument, rejected before any system call")
    func invalidRanges() throws {
        let uffd = try UserfaultFD(requiredFeatures: [.pagefaultFlagWP, .move, .poison])
        defer { uffd.close() }
        let mapping = try TestMapping(pages: 2)
        defer { mapping.unmap() }
        let pageSize = uffd.pageSize
        let bad: [MemoryRange] = [
            MemoryRange(start: mapping.address + 1, length: pageSize),  // unaligned start
            MemoryRange(start: mapping.address + 2048, length: pageSize),
            MemoryRange(start: mapping.address, length: pageSize + 1),  // unaligned length
            MemoryRange(start: mapping.address, length: 100),
            MemoryRange(start: mapping.address, length: 0),  // empty
            MemoryRange(start: mapping.address, length: -pageSize),  // negative
            MemoryRange(start: UInt.max & ~UInt(pageSize - 1), length: 2 * pageSize),  // wraps around
        ]
        let source = sourcePage(1)
        try source.withUnsafeBytes { buffer in
            for range in bad {
                for (operation, call) in Self.operations(uffd, source: buffer.baseAddress!) {
                    let error = expectUserfaultError(.invalidArgument) { () throws(UserfaultError) in try call(range) }
                    #expect(error?.operation == operation, "\(range)")
                    #expect(error?.errno == nil, "\(operation) on \(range) must not reach the kernel")
                    #expect(error?.range == range)
                }
            }
            // MOVE also checks its source.
            try uffd.register(mapping.pages(1), mode: .missing)
            let error = expectUserfaultError(.invalidArgument) { () throws(UserfaultError) in
                try uffd.move(from: mapping.page(0) + 8, to: mapping.page(1), length: pageSize)
            }
            #expect(error?.errno == nil)
        }
        // No harm done: the first page was never registered (another userfaultfd can take it), and the handle works.
        let other = try UserfaultFD()
        defer { other.close() }
        try other.register(mapping.pages(0), mode: .missing)
        try uffd.zeroPage(mapping.pages(1))
        #expect(peek(mapping.page(1)) == 0)
        #expect(!uffd.isClosed)
    }

    @Test("EEXIST is pageExists, not a generic system error")
    func pageExistsIsItsOwnCase() throws {
        let uffd = try UserfaultFD()
        defer { uffd.close() }
        let mapping = try TestMapping(pages: 1)
        defer { mapping.unmap() }
        mapping.fill(page: 0, with: 9)  // present before registration
        try uffd.register(mapping.range, mode: .missing)
        var source = sourcePage(1)
        let error = expectUserfaultError(.pageExists) { () throws(UserfaultError) in
            try uffd.copy(from: &source, to: mapping.address, length: uffd.pageSize)
        }
        #expect(error?.errno == EEXIST)
        #expect(error?.code != .system)
        #expect(peek(mapping.address) == 9, "the present page was left alone")
    }

    @Test("errno maps to codes", arguments: [
        (EEXIST, UserfaultError.Code.pageExists), (EAGAIN, .tryAgain(bytesCompleted: 0)), (ENOENT, .notRegistered),
        (EBUSY, .busy), (ESRCH, .processExited), (EFAULT, .badAddress), (EPERM, .permissionDenied),
        (EINVAL, .invalidArgument), (EBADF, .closed), (ENOMEM, .system), (EIO, .system),
    ])
    func errnoMapping(errno: Int32, code: UserfaultError.Code) {
        let error = UserfaultError(operation: .copy, errno: errno)
        #expect(error.code == code)
        #expect(error.errno == errno)
        #expect(error.operation == .copy)
    }

    @Test func tryAgainCarriesBytesCompleted() {
        let error = UserfaultError(operation: .move, errno: EAGAIN, bytesCompleted: 8192)
        #expect(error.code == .tryAgain(bytesCompleted: 8192))
        #expect(error.code != .tryAgain(bytesCompleted: 4096))
    }

    @Test func descriptionReadsAsASentence() {
        let range = MemoryRange(start: 0x10000, length: 0x2000)
        let error = UserfaultError(operation: .copy, errno: EEXIST, range: range, detail: "while testing")
        let text = error.description
        #expect(text.hasPrefix("userfaultfd copy failed: a page is already present"))
        #expect(text.contains("0x10000..<0x12000 (8192 bytes)"))
        #expect(text.contains("errno \(EEXIST)"))
        #expect(text.contains(String(cString: strerror(EEXIST))))
        #expect(text.hasSuffix("while testing"))
        let unknown = UserfaultError(.unknownEvent(0x42), operation: .readEvents)
        #expect(unknown.description.contains("0x42"))
        #expect(!unknown.description.contains("errno"))
    }
}
