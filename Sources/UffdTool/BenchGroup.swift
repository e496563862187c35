/// One group of `uffd bench` (P1…P5): a workload measured with the library and with its reference in the same run.
///
/// A new group is one file with a type that conforms, and one line in ``BenchCommand/groups``.
protocol BenchGroup: Sendable {
    /// What `--only` selects (P1…), and the prefix of the group's row ids (P2a…).
    var id: String { get }
    /// What the group measures, in a few words.
    var title: String { get }
    /// Runs the workloads with `bench`'s sizes and options, and returns the rows of the table and the detail lines.
    func run(in bench: BenchCommand) async throws -> BenchGroupResult
}

/// What a ``BenchGroup`` measured.
struct BenchGroupResult: Sendable {
    /// Its lines of the table.
    var rows: [BenchCommand.Row]
    /// Lines printed under the table (statistics, counters).
    var details: [String]
}
