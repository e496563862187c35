import Foundation
import Glibc
import Userfaultfd
import UserfaultfdBenchSupport

/// `uffd track`: writes at random into a region, round after round, and prints the dirty ranges a ``DirtyTracker``
/// reports, checked against what was written.
public struct TrackCommand: Sendable {
    public var pages: Int
    public var rounds: Int
    public var engine: DirtyTracker.Engine?
    public var seed: UInt64

    public init(pages: Int = 64, rounds: Int = 4, engine: DirtyTracker.Engine? = nil, seed: UInt64 = 1) {
        self.pages = pages
        self.rounds = rounds
        self.engine = engine
        self.seed = seed
    }

    /// Runs the rounds; returns whether every round matched. Writes happen on a dedicated thread (with the fault engine
    /// each first write waits for the tracker).
    @discardableResult
    public func run(output: (String) -> Void = { print($0) }) async throws -> Bool {
        let memory = try AnonymousMemory(length: pages * systemPageSize)
        let tracker = try DirtyTracker(range: memory.range, engine: engine)
        output("tracking \(pages) pages with \(tracker.engine)")
        try await tracker.start()
        var random = SplitMix64(seed: seed)
        var allMatched = true
        for round in 1...rounds {
            let written = Set((0..<pages).filter { _ in random.next() % 4 == 0 })
            let base = memory.address, pageSize = systemPageSize, order = written.sorted()
            await DedicatedThread.run {
                for page in order { UnsafeMutablePointer<UInt8>(bitPattern: base + UInt(page * pageSize))!.pointee &+= 1 }
            }.value
            let dirty = try await tracker.collectPages()
            let matched = Set(dirty) == written
            allMatched = allMatched && matched
            let text = dirty.runs.map { run in
                run.count == 1 ? "\(run.lowerBound)" : "\(run.lowerBound)-\(run.upperBound - 1)"
            }.joined(separator: " ")
            output("round \(round): \(written.count) pages written, dirty [\(text)] \(matched ? "ok" : "MISMATCH")")
        }
        await tracker.stop()
        output(allMatched ? "all rounds match" : "some rounds did not match")
        return allMatched
    }
}
