/// What the faulting threads get when a provider fails (throws, or does not answer within the timeout).
///
/// The faulting thread never hangs: after the retries, the pages are resolved one way or the other.
public indirect enum FailurePolicy: Sendable, Hashable {
    /// Poison the pages (`UFFDIO_POISON`): the faulting thread gets SIGBUS, as for an mmapped file whose disk failed.
    case poison
    /// Map zero pages: the faulting thread reads zeros.
    case zeroFill
    /// Retry the read up to `attempts` more times, waiting `backoff`, then twice as long each time; then `then`.
    case retry(attempts: Int, backoff: Duration, then: FailurePolicy)

    /// Three retries from 10 ms, then poison.
    public static let `default` = FailurePolicy.retry(attempts: 3, backoff: .milliseconds(10), then: .poison)

    /// The policy after the retries.
    var terminal: FailurePolicy {
        if case .retry(_, _, let then) = self { return then.terminal }
        return self
    }

    /// The wait before retry number `attempt` (1-based), or nil when retries are exhausted.
    func backoff(beforeRetry attempt: Int) -> Duration? {
        guard case .retry(let attempts, let backoff, _) = self, attempt <= attempts else { return nil }
        return backoff * (1 << min(attempt - 1, 20))
    }
}

/// How many pages one fault brings in.
///
/// Sequential faults grow the cluster, like the kernel's readahead: a fault right after (or right before) a stream's
/// previous cluster doubles that stream's window, up to `maximum` bytes; any other fault starts a new stream from
/// `initial`. Up to 8 interleaved streams per region are followed at once, forwards or backwards (a large `memcpy`
/// reads four parts of its source in turn, or copies from the end). Clusters never extend past the region or the
/// provider's data, and never over a page that is present or already being fetched.
public enum ReadaheadPolicy: Sendable, Hashable {
    /// Strictly one page per fault (and no alignment to the provider's preferred read size).
    case none
    /// Adaptive readahead from `initial` to `maximum` bytes.
    ///
    /// With `asynchronous`, once sequential faults have grown the window to `maximum`, each fault of the stream also
    /// fetches the next window ahead of the application, so reading and resolving overlap (the kernel's async
    /// readahead). Turn it off when no byte beyond what is touched may be read (metered remote reads).
    case adaptive(initial: Int = 4096, maximum: Int = 1 << 20, asynchronous: Bool = true)

    /// Whether established streams read a window ahead of their faults.
    var readsAhead: Bool {
        if case .adaptive(_, _, let asynchronous) = self { return asynchronous }
        return false
    }

    /// Adaptive, from one page to 1 MiB, reading ahead of established streams.
    public static let `default` = ReadaheadPolicy.adaptive()

    func initialPages(pageSize: Int) -> Int {
        switch self {
        case .none: 1
        case .adaptive(let initial, _, _): max(1, initial / pageSize)
        }
    }

    func maximumPages(pageSize: Int) -> Int {
        switch self {
        case .none: 1
        case .adaptive(let initial, let maximum, _): max(1, max(initial, maximum) / pageSize)
        }
    }
}

/// What a page gets when it faults again after a REMOVE event (`madvise(MADV_DONTNEED)`, a balloon inflating).
public enum RemovedPagePolicy: Sendable, Hashable {
    /// Ask the provider again, as on first touch.
    case refetch
    /// Serve zero pages: the memory was given back, so its old content is gone (Firecracker's balloon semantics).
    case zeroFill
}

/// What faults get once resolution has been cancelled (the structured scope of a ``LazyRegion`` was cancelled, or the
/// resolver shut down with faults pending).
public enum CancellationResolution: Sendable, Hashable {
    /// Zero pages.
    case zeroFill
    /// Poisoned pages (SIGBUS in the accessing thread).
    case poison
}

/// A provider failure, reported to the application while the failure policy resolves the pages.
public struct RegionError: Error, Sendable, CustomStringConvertible {
    /// The pages concerned (page-aligned).
    public var range: MemoryRange
    /// The offset in the provider's data.
    public var providerOffset: Int
    /// What the provider threw (or a ``ProviderTimeoutError``).
    public var underlying: any Error
    /// How many times the read was attempted.
    public var attempts: Int
    /// What the faulting threads got.
    public var resolution: FailurePolicy

    public var description: String {
        "provider read at offset \(providerOffset) for \(range) failed after \(attempts) attempt(s): \(underlying); resolved with \(resolution)"
    }
}

/// A provider read took longer than the resolver's timeout.
public struct ProviderTimeoutError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The timeout that passed.
    public var timeout: Duration
    public var description: String { "the provider did not answer within \(timeout)" }
}
