import Foundation
import Userfaultfd

/// userfaultfd(2)'s example program, in Swift: a region of `pages` pages registered MISSING; a reader thread reads one
/// byte every 1024 bytes starting at offset 0xf; each fault is served, in the order it arrives, with a page filled with the
/// next letter ('A', 'B', ... after 'T' it starts again, as in the man page) by a `for try await` loop over the events.
public struct ManPageDemo: Sendable {
    /// Pages in the region.
    public var pages: Int
    /// Pause of the reader between reads (the man page sleeps 100 ms); zero by default.
    public var readDelay: Duration
    /// Where each line of output goes.
    public var log: @Sendable (String) -> Void

    public init(pages: Int = 4, readDelay: Duration = .zero, log: @escaping @Sendable (String) -> Void = { print($0) }) {
        self.pages = pages
        self.readDelay = readDelay
        self.log = log
    }

    /// What a run saw.
    public struct Outcome: Sendable, Equatable {
        /// The byte read at each offset, in order.
        public var reads: [(offset: Int, byte: UInt8)]
        /// The page-aligned address of each fault served, in the order served, relative to the region's start.
        public var faultOffsets: [Int]
        /// The letter served for each fault, in order.
        public var servedLetters: [UInt8]

        public static func == (lhs: Outcome, rhs: Outcome) -> Bool {
            lhs.reads.map(\.offset) == rhs.reads.map(\.offset) && lhs.reads.map(\.byte) == rhs.reads.map(\.byte)
                && lhs.faultOffsets == rhs.faultOffsets && lhs.servedLetters == rhs.servedLetters
        }
    }

    /// The letter the man page serves for the `index`-th fault (0-based): 'A' + index % 20.
    public static func letter(forFault index: Int) -> UInt8 {
        UInt8(ascii: "A") + UInt8(index % 20)
    }

    /// Runs the demo and returns what was read and served.
    public func run() async throws -> Outcome {
        precondition(pages > 0, "pages must be positive")
        let pageSize = systemPageSize
        let length = pages * pageSize
        let uffd = try UserfaultFD()
        defer { uffd.close() }
        let region = try AnonymousMemory(length: length)
        let base = region.address
        try uffd.register(MemoryRange(start: base, length: length), mode: .missing)
        log("Address returned by mmap() = 0x\(String(base, radix: 16))")

        // The reader runs on a thread of its own: it blocks in the kernel on each fault, so it must not be a thread the
        // event loop needs.
        let delay = readDelay
        let log = log
        let reads = DedicatedThread.run { () -> [(offset: Int, byte: UInt8)] in
            var reads: [(offset: Int, byte: UInt8)] = []
            var offset = 0xf
            while offset < length {
                let byte = UnsafePointer<UInt8>(bitPattern: base + UInt(offset))!.pointee
                reads.append((offset, byte))
                log("Read address 0x\(String(base + UInt(offset), radix: 16)) in main(): \(Character(UnicodeScalar(byte)))")
                offset += 1024
                if delay > .zero { Thread.sleep(forTimeInterval: Double(delay.components.seconds) + Double(delay.components.attoseconds) / 1e18) }
            }
            return reads
        }

        // The event loop: one page per fault, filled with the next letter.
        let page = try AnonymousMemory(length: pageSize)
        var faultOffsets: [Int] = []
        var served: [UInt8] = []
        try await withTaskExecutorPreference(uffd.eventExecutor) {
            for try await event in uffd.events {
                guard case .pageFault(let fault) = event else { continue }
                log("    UFFD_EVENT_PAGEFAULT event: flags = 0x\(String(fault.flags, radix: 16)); address = 0x\(String(fault.address, radix: 16))")
                let letter = Self.letter(forFault: served.count)
                memset(page.baseAddress, Int32(letter), pageSize)
                do {
                    let copied = try uffd.copy(from: page.baseAddress, to: fault.pageAddress, length: pageSize)
                    log("        (uffdio_copy.copy returned \(copied))")
                } catch let error as UserfaultError where error.code == .pageExists {
                    // Another message for a page already served (a thread re-faulted): wake it and go on.
                    try uffd.wake(MemoryRange(start: fault.pageAddress, length: pageSize))
                    continue
                }
                faultOffsets.append(Int(fault.pageAddress - base))
                served.append(letter)
                if served.count == pages { break }
            }
        }
        return Outcome(reads: await reads.value, faultOffsets: faultOffsets, servedLetters: served)
    }
}
