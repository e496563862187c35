import CUserfaultfdBaseline
import Dispatch
import Foundation
import Glibc
import Synchronization
import Userfaultfd

/// `uffd bench`: the library against the C reference (userfaultfd(2)'s poll → read → UFFDIO_COPY handler), in one run.
///
/// Every workload faults from threads of its own (never from Swift's cooperative pool), and each row compares the library
/// with its reference measured in the same process, right after it. The full suite for the benchmark plugin lives in
/// Benchmarks/ (with allocation counts); this one needs nothing but the toolchain.
public struct BenchCommand: Sendable {
    /// Smaller sizes: the whole run in seconds instead of a minute.
    public var quick: Bool
    /// Only these ids (P1…P5, or a row id such as P2b); all when nil.
    public var only: Set<String>?
    /// The resolver's polling window in the library runs (``FaultResolver/Options/pollingWindow``; its default when nil).
    public var pollingWindow: Duration?
    /// Progress on stderr.
    public var showProgress: Bool
    /// Where the table goes.
    public var log: @Sendable (String) -> Void

    public init(quick: Bool = false, only: Set<String>? = nil, pollingWindow: Duration? = nil, showProgress: Bool = true,
                log: @escaping @Sendable (String) -> Void = { print($0) }) {
        self.quick = quick
        self.only = only
        self.pollingWindow = pollingWindow
        self.showProgress = showProgress
        self.log = log
    }

    /// One line of the table.
    public struct Row: Sendable {
        public var id: String
        public var workload: String
        public var library: String
        public var reference: String
        /// Library speed ÷ reference speed (1.00 = as fast), when the two compare.
        public var ratio: Double?
        public var goal: String
        /// nil when the row has no goal.
        public var met: Bool?
    }

    /// The benchmark groups, in the order they run. A new group is a type of its own file and one line here.
    static let groups: [any BenchGroup] = [
        RoundTripBench(),
        ZeroPagesBench(),
        SlowProviderBench(),
        FileBench(),
        SparseRegionBench(),
    ]

    /// The ids of the groups (P1…P5), in order: what `--only` takes, with the row ids that start with them.
    public static var groupIDs: [String] { groups.map(\.id) }

    /// Runs the selected benchmarks, prints the table and the details, and returns the rows.
    @discardableResult
    public func run() async throws -> [Row] {
        var rows: [Row] = []
        var details: [String] = []
        let started = ContinuousClock.now
        for group in Self.groups where only == nil || only!.contains(where: { $0.hasPrefix(group.id) }) {
            let result = try await group.run(in: self)
            rows += result.rows.filter { selected($0.id) }
            details += result.details
        }
        clearProgress()
        log(Self.table(rows))
        if !details.isEmpty {
            log("")
            details.forEach(log)
        }
        log("")
        log("ratio = library speed ÷ reference speed (1.00× = as fast). \(quick ? "--quick sizes. " : "")"
            + "Total \(format(seconds: seconds(ContinuousClock.now - started)))."
            + " Allocation counts per fault: `swift package benchmark` in Benchmarks/.")
        return rows
    }

    private func selected(_ id: String) -> Bool {
        guard let only else { return true }
        // A group (P2) selects its rows (P2a…), a row id (P2A: ids are compared uppercased) itself.
        return only.contains(id.uppercased()) || only.contains(String(id.prefix(2)))
    }

    // MARK: - Output

    static func table(_ rows: [Row]) -> String {
        let header = ["id", "workload", "library", "reference", "ratio", "goal", "met?"]
        let cells = rows.map { row in
            [row.id, row.workload, row.library, row.reference, row.ratio.map { String(format: "%.2f×", $0) } ?? "—", row.goal,
             row.met.map { $0 ? "yes" : "no" } ?? "—"]
        }
        let widths = header.indices.map { column in
            ([header] + cells).map { $0[column].count }.max() ?? 0
        }
        func line(_ values: [String]) -> String {
            "| " + values.enumerated().map { $0.element.padding(toLength: widths[$0.offset], withPad: " ", startingAt: 0) }
                .joined(separator: " | ") + " |"
        }
        let separator = "|" + widths.map { String(repeating: "-", count: $0 + 2) }.joined(separator: "|") + "|"
        return ([line(header), separator] + cells.map(line)).joined(separator: "\n")
    }

    func progress(_ text: String) {
        guard showProgress else { return }
        if isatty(STDERR_FILENO) == 1 {
            writeError("\r\u{1B}[K" + text + "…")
        } else {
            writeError(text + "…\n")
        }
    }

    func clearProgress() {
        if showProgress, isatty(STDERR_FILENO) == 1 { writeError("\r\u{1B}[K") }
    }

    func kiPages(_ pages: Int) -> String { pages % 1024 == 0 ? "\(pages / 1024) Ki" : "\(pages)" }
    func format(nsPerPage: Double) -> String { String(format: "%.1f µs/page", nsPerPage / 1e3) }
    func format(mbps: Double) -> String { String(format: "%.0f MB/s", mbps) }
    func format(seconds: Double) -> String { String(format: "%.1f s", seconds) }
    func seconds(_ duration: Duration) -> Double {
        Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
    }
}
