import Foundation
import Userfaultfd

/// The seed's pattern example: a region whose bytes repeat the alphabet, produced by a closure-based provider only when
/// a page is touched, and printed page by page.
public struct AbcExample: Sendable {
    public var pages: Int
    public var log: @Sendable (String) -> Void

    public init(pages: Int = 4, log: @escaping @Sendable (String) -> Void = { print($0) }) {
        self.pages = pages
        self.log = log
    }

    /// The byte at `offset` of the pattern: "abc...z" repeated.
    public static func byte(at offset: Int) -> UInt8 { UInt8(ascii: "a") + UInt8(offset % 26) }

    /// The provider: fills any range with the pattern, computed on demand.
    public static let provider = ClosureProvider { buffer, offset in
        buffer.withUnsafeMutableBytes { bytes in
            for index in bytes.indices { bytes[index] = AbcExample.byte(at: offset + index) }
        }
        return .bytes(buffer.count)
    }

    /// Prints the first 32 bytes of each page, faulting the pages in one by one; returns those lines and the statistics.
    public func run() async throws -> (lines: [String], statistics: FaultResolver.Statistics) {
        let pageSize = systemPageSize
        let options = FaultResolver.Options(readahead: .none)
        return try await LazyRegion.with(length: pages * pageSize, provider: Self.provider, options: options) { region in
            let base = UInt(bitPattern: region.baseAddress)
            let pages = self.pages
            // The reads fault; they run on a thread of their own, never on the cooperative pool.
            let lines = await DedicatedThread.run { () -> [String] in
                (0..<pages).map { page in
                    let start = UnsafeRawPointer(bitPattern: base + UInt(page * pageSize))!
                    let text = String(decoding: UnsafeRawBufferPointer(start: start, count: 32), as: UTF8.self)
                    return "page \(page) at 0x\(String(base + UInt(page * pageSize), radix: 16)): \(text)..."
                }
            }.value
            lines.forEach(log)
            return (lines, region.statistics)
        }
    }
}
