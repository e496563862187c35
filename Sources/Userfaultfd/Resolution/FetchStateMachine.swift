/// What pages get when no provider data goes into them: the one spelling of "zeros or poison" for provider data that is
/// zeros, for a failure policy's end, for cancelled resolution, and for the waiters of a fetch that is given up.
enum PageFill: Hashable, Sendable {
    /// Zero pages (the shared zero page, or copied zeros where the memory has none).
    case zeros
    /// Poisoned pages: SIGBUS in the accessing thread.
    case poison

    /// At the end of a failure policy (after its retries).
    init(_ policy: FailurePolicy) {
        self = policy.terminal == .poison ? .poison : .zeros
    }

    /// Once resolution is cancelled.
    init(_ resolution: CancellationResolution) {
        switch resolution {
        case .zeroFill: self = .zeros
        case .poison: self = .poison
        }
    }
}

/// How a fetch's pages go in: the provider's bytes from its buffer, or a fill.
enum Installation: Hashable, Sendable {
    case copy
    case fill(PageFill)
}

/// The life of one fetch — a provider read for a cluster of pages and its installation — as a value: each event of the
/// fetch is a transition that returns what the resolver must do next (a ``Step``), and the resolver carries it out.
///
/// ```
/// created ──(no data)──────────────────────────────────────────────┐
///    │ readImmediately: answered ──────────────────────────────────┤
///    │                  declined                                   ▼
///    └──► waitingForSlot ──slotGranted──► reading ──answered──► installing ──► finished(installed)
///              ▲                            │  │                  │  ▲
///              └──retryDue── backingOff ◄───┘  └──► finished(failed) ◄── a page refused even alone
///                              (failed or timed out, retries left)    │  deferred (EAGAIN): stays installing
/// any state ──abandon──► finished(invalidated | cancelled); installing ──closed/exited──► finished(addressSpaceGone)
/// ```
///
/// Nothing here touches the kernel, a buffer or a clock: the transitions are plain functions of the fetch's state and
/// their inputs, unit-tested as such (`FetchStateMachineTests`).
struct FetchStateMachine {
    enum State {
        /// Made; no read yet.
        case created
        /// Wants a provider read and waits for a read slot (or is about to be granted one).
        case waitingForSlot
        /// A provider read is running and holds a read slot; `attempt` identifies it (late results of an abandoned
        /// attempt, and its stale timeout, name an older one).
        case reading(attempt: Int)
        /// An attempt failed; a retry is due after the failure policy's backoff.
        case backingOff(attempt: Int)
        /// The data (or a fill) is being installed; progress is kept across deferrals.
        case installing(Installing)
        /// Over; the fetch is released.
        case finished(Ending)
    }

    /// Installation progress.
    struct Installing {
        var how: Installation
        /// Bytes done (installed, found present, or refused and left to the failure policy), from the first page on.
        var installed = 0
        /// How many bytes the next part tries: halved when the kernel refuses a range whole, doubled after a success.
        var chunk = 0
    }

    /// How a fetch ended, which says what its waiting threads get.
    enum Ending: Equatable {
        /// Every page is in; the installs woke the threads.
        case installed
        /// The userfaultfd was closed or its address space exited: nobody is left waiting.
        case addressSpaceGone
        /// Its pages were removed, unmapped or moved: the data must not go in; threads are woken to fault again.
        case invalidated
        /// Resolution was cancelled: threads get the fill; prefetches get `CancellationError`.
        case cancelled(PageFill)
        /// The failure policy gave up (or a page was refused even alone): threads get the fill, the failure is reported.
        case failed(PageFill)

        /// What the pages the threads wait on get.
        var waiters: WaiterRelease {
            switch self {
            case .installed, .addressSpaceGone: .leave
            case .invalidated: .wake
            case .cancelled(let fill), .failed(let fill): .fill(fill)
            }
        }
    }

    /// What the threads waiting on a fetch that ends get.
    enum WaiterRelease: Equatable {
        /// Nothing: the installs woke them, or nobody waits.
        case leave
        /// Woken at the address they faulted at: they fault again and get a fresh resolution.
        case wake
        /// Each page they wait on, unless present already, is filled (or woken if that fails).
        case fill(PageFill)
    }

    /// What the resolver does for the fetch after a transition.
    enum Action: Equatable {
        /// Nothing (a stale event: a late timer, a transition that does not apply in this state).
        case nothing
        /// A late result of an abandoned attempt: only its buffer is given back.
        case discardLateResult
        /// Take a buffer and ask the provider for an immediate answer.
        case readImmediately
        /// Launch the read if a slot is free, else queue the fetch for one.
        case waitForSlotOrLaunch
        /// Launch provider read number `attempt` (and its timeout).
        case launch(attempt: Int)
        /// Install; first zero the buffer from this byte on (the provider wrote fewer bytes).
        case install(clearingFrom: Int?)
        /// Retry after `delay`: a timer that delivers ``retryDue(attempt:)``.
        case retry(after: Duration, attempt: Int)
        /// End the fetch.
        case end(Ending)
    }

    /// How the read holding a slot ended, when a transition ends it.
    enum ReadEnd {
        /// Its result came: the slot is free; the buffer is the fetch's.
        case returned
        /// Given up while running (timeout, cancellation, invalidation): the slot is free, its task is cancelled, and its
        /// buffer stays with it until it returns.
        case abandoned
    }

    /// A transition's result: the read it ended, if any (carried out first), then the action.
    struct Step: Equatable {
        var readEnd: ReadEnd?
        var action: Action

        init(_ action: Action, readEnd: ReadEnd? = nil) {
            self.action = action
            self.readEnd = readEnd
        }
    }

    /// One step of an installation, after a part was tried.
    enum InstallStep: Equatable {
        /// These pages went in: mark them present and count them.
        case installed(Range<Int>)
        /// This page was present already (someone else resolved it): wake whoever waits on it, mark it present.
        case alreadyPresent(Int)
        /// The kernel refused the part whole, or refused a single page (left for the failure policy): go on.
        case next
        /// The kernel deferred (`EAGAIN` with nothing done: an event is unread): retry the installation after the next
        /// batch of events.
        case deferred
        /// Nobody is left to install for (closed, exited): the fetch has ended.
        case gone
    }

    let pages: Range<Int>
    let pageSize: Int
    /// Started by asynchronous readahead, ahead of any fault.
    let isReadahead: Bool
    private(set) var state = State.created
    /// Provider attempts so far.
    private(set) var attempts = 0
    /// Why a page could not be installed even alone (it then gets the failure policy). Kept out of ``state`` so that
    /// the state stays plain data, copied without reference counting on the fault path.
    private(set) var refusal: UserfaultError?

    init(pages: Range<Int>, pageSize: Int, isReadahead: Bool = false) {
        self.pages = pages
        self.pageSize = pageSize
        self.isReadahead = isReadahead
    }

    var length: Int { pages.count * pageSize }

    var isFinished: Bool {
        if case .finished = state { return true }
        return false
    }

    /// How the pages are being installed (nil before the data came).
    var installation: Installation? {
        if case .installing(let progress) = state { return progress.how }
        return nil
    }

    /// Whether read `attempt` is the one running (not a late or abandoned one).
    func isReading(attempt: Int) -> Bool {
        if case .reading(attempt) = state { return true }
        return false
    }

    // MARK: - Reading

    /// Starts the fetch: with `dataBytes` of provider data, a read (immediate if the provider can answer at once);
    /// without, straight to zeros.
    mutating func start(dataBytes: Int) -> Step {
        guard case .created = state else { return Step(.nothing) }
        if dataBytes == 0 { return fill(.zeros) }
        return Step(.readImmediately)
    }

    /// Starts the fetch as a fill with no provider read (pages removed under the zero-fill policy).
    mutating func fill(_ fill: PageFill) -> Step {
        guard case .created = state else { return Step(.nothing) }
        state = .installing(Installing(how: .fill(fill)))
        return Step(.install(clearingFrom: nil))
    }

    /// The provider answered at once (the first attempt).
    mutating func answeredImmediately(_ content: PageContent) -> Step {
        guard case .created = state else { return Step(.nothing) }
        attempts = 1
        return arrived(content)
    }

    /// The provider's immediate read threw (the first attempt).
    mutating func failedImmediately(retryAllowed: Bool, policy: FailurePolicy) -> Step {
        guard case .created = state else { return Step(.nothing) }
        attempts = 1
        return failed(retryAllowed: retryAllowed, policy: policy)
    }

    /// The provider has no immediate answer: an asynchronous read is needed.
    mutating func declinedImmediately() -> Step {
        guard case .created = state else { return Step(.nothing) }
        state = .waitingForSlot
        return Step(.waitForSlotOrLaunch)
    }

    /// A read slot is granted (and the buffer is at hand): the next attempt runs.
    mutating func slotGranted() -> Step {
        guard case .waitingForSlot = state else { return Step(.nothing) }
        attempts += 1
        state = .reading(attempt: attempts)
        return Step(.launch(attempt: attempts))
    }

    /// Read `attempt` returned with content.
    mutating func readReturned(attempt: Int, _ content: PageContent) -> Step {
        guard case .reading(attempt) = state else { return Step(.discardLateResult) }
        var step = arrived(content)
        step.readEnd = .returned
        return step
    }

    /// Read `attempt` threw.
    mutating func readReturned(attempt: Int, failureWithRetryAllowed retryAllowed: Bool, policy: FailurePolicy) -> Step {
        guard case .reading(attempt) = state else { return Step(.discardLateResult) }
        var step = failed(retryAllowed: retryAllowed, policy: policy)
        step.readEnd = .returned
        return step
    }

    /// Read `attempt`'s timeout passed: if it still runs, it is abandoned and counts as a failure.
    mutating func readTimedOut(attempt: Int, retryAllowed: Bool, policy: FailurePolicy) -> Step {
        guard case .reading(attempt) = state else { return Step(.nothing) }
        var step = failed(retryAllowed: retryAllowed, policy: policy)
        step.readEnd = .abandoned
        return step
    }

    /// The backoff before retrying after `attempt` is over.
    mutating func retryDue(attempt: Int) -> Step {
        guard case .backingOff(attempt) = state else { return Step(.nothing) }
        state = .waitingForSlot
        return Step(.waitForSlotOrLaunch)
    }

    /// Something other than a read failed before the read (no buffer to read into).
    mutating func failedBeforeReading(retryAllowed: Bool, policy: FailurePolicy) -> Step {
        switch state {
        case .created, .waitingForSlot: return failed(retryAllowed: retryAllowed, policy: policy)
        default: return Step(.nothing)
        }
    }

    /// Ends the fetch now, whatever it was doing (cancellation, invalidation): a read in flight is abandoned.
    mutating func abandon(_ ending: Ending) -> Step {
        if case .finished = state { return Step(.nothing) }
        let readEnd: ReadEnd? = if case .reading = state { .abandoned } else { nil }
        state = .finished(ending)
        return Step(.end(ending), readEnd: readEnd)
    }

    private mutating func arrived(_ content: PageContent) -> Step {
        switch content {
        case .zeros:
            state = .installing(Installing(how: .fill(.zeros)))
            return Step(.install(clearingFrom: nil))
        case .bytes(let count):
            state = .installing(Installing(how: .copy))
            let filled = max(0, min(count, length))
            return Step(.install(clearingFrom: filled < length ? filled : nil))
        }
    }

    /// The failure policy's decision after a failed attempt: retry after its backoff, or give up.
    private mutating func failed(retryAllowed: Bool, policy: FailurePolicy) -> Step {
        if retryAllowed, let delay = policy.backoff(beforeRetry: attempts) {
            state = .backingOff(attempt: attempts)
            return Step(.retry(after: delay, attempt: attempts))
        }
        let ending = Ending.failed(PageFill(policy))
        state = .finished(ending)
        return Step(.end(ending))
    }

    // MARK: - Installing

    /// (Re)starts the installation where it stopped: the next part tries everything left.
    mutating func resumeInstalling() {
        guard case .installing(var progress) = state else { return }
        progress.chunk = length - progress.installed
        state = .installing(progress)
    }

    /// The next part to install, as a byte offset and length in the fetch; nil once every page is done (or the fetch
    /// is not installing).
    var nextPart: (offset: Int, length: Int)? {
        guard case .installing(let progress) = state, progress.installed < length else { return nil }
        return (progress.installed, min(progress.chunk, length - progress.installed))
    }

    /// The part ``nextPart`` named went in whole.
    mutating func partInstalled() -> InstallStep {
        guard case .installing(var progress) = state, let part = nextPart else { return .next }
        let first = pages.lowerBound + part.offset / pageSize
        progress.installed += part.length
        progress.chunk = 2 * part.length
        state = .installing(progress)
        return .installed(first..<first + part.length / pageSize)
    }

    /// The part ``nextPart`` named failed with `error`.
    mutating func partFailed(_ error: UserfaultError) -> InstallStep {
        guard case .installing(var progress) = state, let part = nextPart else { return .next }
        let first = pages.lowerBound + part.offset / pageSize
        defer { if case .installing = state { state = .installing(progress) } }
        switch error.code {
        case .tryAgain(let done) where done > 0:
            // Partial progress: the prefix went in (and its threads were woken); go on after it.
            let done = done / pageSize * pageSize
            progress.installed += done
            return .installed(first..<first + done / pageSize)
        case .pageExists:
            progress.installed += pageSize
            return .alreadyPresent(first)
        case .tryAgain:
            return .deferred
        case .closed, .processExited:
            state = .finished(.addressSpaceGone)
            return .gone
        default:
            if part.length > pageSize {
                // Refused whole (across two mappings, out of memory): try half of it.
                progress.chunk = part.length / pageSize / 2 * pageSize
            } else {
                // This page alone is refused too: leave it for the failure policy, go on after it.
                refusal = error
                progress.installed += pageSize
            }
            return .next
        }
    }

    /// Every part is done: the fetch is installed, or gets the failure policy for a page refused even alone.
    mutating func installFinished(policy: FailurePolicy) -> Step {
        guard case .installing(let progress) = state, progress.installed >= length else { return Step(.nothing) }
        let ending: Ending = refusal == nil ? .installed : .failed(PageFill(policy))
        state = .finished(ending)
        return Step(.end(ending))
    }
}

/// The resolver's provider-read slots: at most `limit` reads in flight, and the fetches (by id) waiting for one, in
/// order.
struct ReadSlots {
    let limit: Int
    private(set) var active = 0
    private(set) var waiting: [Int] = []

    init(limit: Int) {
        self.limit = limit
    }

    var isFree: Bool { active < limit }

    /// The one decision "launch now, or wait for a slot": true when a slot is free (the caller launches, then
    /// ``take()``s it); otherwise `id` is queued.
    mutating func launchOrQueue(_ id: Int) -> Bool {
        if isFree { return true }
        waiting.append(id)
        return false
    }

    mutating func take() { active += 1 }

    mutating func give() { active -= 1 }

    /// The next fetch to launch, while a slot is free.
    mutating func nextWaiting() -> Int? {
        guard isFree, !waiting.isEmpty else { return nil }
        return waiting.removeFirst()
    }

    mutating func removeAllWaiting() {
        waiting.removeAll()
    }
}
