import Testing
@testable import Userfaultfd

/// The transitions of a fetch's life (`FetchStateMachine`) and of the read slots (`ReadSlots`), as plain values: no
/// userfaultfd, no provider, no clock. The resolver's suites check that the actor carries the steps out.
/// Evaluates a mutating transition where `#expect` would take its receiver as an immutable value.
private func take<T>(_ value: T) -> T { value }

@Suite("Fetch state machine")
struct FetchStateMachineTests {
    typealias Machine = FetchStateMachine
    typealias Step = FetchStateMachine.Step

    static let pageSize = 4096
    /// Eight pages, 10 to 17 of their region.
    static func machine() -> Machine { Machine(pages: 10..<18, pageSize: pageSize) }
    static let retryTwice = FailurePolicy.retry(attempts: 2, backoff: .milliseconds(10), then: .poison)

    /// A machine past an asynchronous launch: read attempt 1 runs.
    static func reading() -> Machine {
        var machine = machine()
        _ = machine.start(dataBytes: 8 * pageSize)
        _ = machine.declinedImmediately()
        _ = machine.slotGranted()
        return machine
    }

    /// A machine installing (provider bytes for all pages).
    static func installing() -> Machine {
        var machine = machine()
        _ = machine.start(dataBytes: 8 * pageSize)
        _ = machine.answeredImmediately(.bytes(8 * pageSize))
        machine.resumeInstalling()
        return machine
    }

    @Test func noDataGoesStraightToZerosWithoutARead() {
        var machine = Self.machine()
        #expect(take(machine.start(dataBytes: 0)) == Step(.install(clearingFrom: nil)))
        #expect(machine.installation == .fill(.zeros))
        #expect(machine.attempts == 0)
        #expect(take(machine.start(dataBytes: 0)) == Step(.nothing), "a fetch starts once")
    }

    @Test func anImmediateAnswerIsInstalledAndAShortOneClearsTheRest() {
        var machine = Self.machine()
        #expect(take(machine.start(dataBytes: 8 * Self.pageSize)) == Step(.readImmediately))
        #expect(take(machine.answeredImmediately(.bytes(5000))) == Step(.install(clearingFrom: 5000)))
        #expect(machine.installation == .copy)
        #expect(machine.attempts == 1)

        var full = Self.machine()
        _ = full.start(dataBytes: 8 * Self.pageSize)
        #expect(take(full.answeredImmediately(.bytes(1 << 30))) == Step(.install(clearingFrom: nil)), "a count past the end is clipped")
        var zeros = Self.machine()
        _ = zeros.start(dataBytes: 8 * Self.pageSize)
        #expect(take(zeros.answeredImmediately(.zeros)) == Step(.install(clearingFrom: nil)))
        #expect(zeros.installation == .fill(.zeros))
    }

    @Test func aDeclinedReadWaitsForASlotThenLaunchesAndItsResultFreesTheSlot() {
        var machine = Self.machine()
        _ = machine.start(dataBytes: 8 * Self.pageSize)
        #expect(take(machine.declinedImmediately()) == Step(.waitForSlotOrLaunch))
        #expect(take(machine.slotGranted()) == Step(.launch(attempt: 1)))
        #expect(take(machine.slotGranted()) == Step(.nothing), "a running read is not launched twice")
        #expect(machine.isReading(attempt: 1))
        #expect(take(machine.readReturned(attempt: 1, .bytes(8 * Self.pageSize))) == Step(.install(clearingFrom: nil), readEnd: .returned))
        #expect(machine.installation == .copy)
    }

    @Test func failuresAreRetriedWithBackoffThenGetThePolicysFill() {
        var machine = Self.reading()
        let policy = Self.retryTwice
        #expect(take(machine.readReturned(attempt: 1, failureWithRetryAllowed: true, policy: policy))
            == Step(.retry(after: .milliseconds(10), attempt: 1), readEnd: .returned))
        #expect(take(machine.retryDue(attempt: 0)) == Step(.nothing), "a timer of another attempt is stale")
        #expect(take(machine.retryDue(attempt: 1)) == Step(.waitForSlotOrLaunch))
        #expect(take(machine.slotGranted()) == Step(.launch(attempt: 2)))
        #expect(take(machine.readReturned(attempt: 2, failureWithRetryAllowed: true, policy: policy))
            == Step(.retry(after: .milliseconds(20), attempt: 2), readEnd: .returned), "the backoff doubles")
        _ = machine.retryDue(attempt: 2)
        #expect(take(machine.slotGranted()) == Step(.launch(attempt: 3)))
        #expect(take(machine.readReturned(attempt: 3, failureWithRetryAllowed: true, policy: policy))
            == Step(.end(.failed(.poison)), readEnd: .returned), "retries exhausted: the policy's end")
        #expect(machine.attempts == 3)
        #expect(machine.isFinished)
        #expect(Machine.Ending.failed(.poison).waiters == .fill(.poison))
    }

    @Test func aFailureThatMayNotBeRetriedEndsAtOnce() {
        var machine = Self.machine()
        _ = machine.start(dataBytes: Self.pageSize)
        #expect(take(machine.failedImmediately(retryAllowed: false, policy: .retry(attempts: 3, backoff: .seconds(1), then: .zeroFill)))
            == Step(.end(.failed(.zeros))))
        #expect(machine.attempts == 1)

        var noBuffer = Self.machine()
        _ = noBuffer.start(dataBytes: Self.pageSize)
        #expect(take(noBuffer.failedBeforeReading(retryAllowed: true, policy: .poison)) == Step(.end(.failed(.poison))))
        #expect(noBuffer.attempts == 0, "no attempt was made")
    }

    @Test func aTimeoutAbandonsTheReadAndItsLateResultIsDiscarded() {
        var machine = Self.reading()
        #expect(take(machine.readTimedOut(attempt: 1, retryAllowed: true, policy: Self.retryTwice))
            == Step(.retry(after: .milliseconds(10), attempt: 1), readEnd: .abandoned))
        #expect(take(machine.readReturned(attempt: 1, .bytes(8 * Self.pageSize))) == Step(.discardLateResult))
        #expect(take(machine.readReturned(attempt: 1, failureWithRetryAllowed: true, policy: Self.retryTwice)) == Step(.discardLateResult))
        _ = machine.retryDue(attempt: 1)
        _ = machine.slotGranted()
        #expect(take(machine.readTimedOut(attempt: 1, retryAllowed: true, policy: Self.retryTwice)) == Step(.nothing),
                "the first attempt's timer does not time out the retry")
        #expect(take(machine.readReturned(attempt: 2, .zeros)) == Step(.install(clearingFrom: nil), readEnd: .returned))
    }

    @Test func abandoningEndsTheFetchOnceAndAbandonsOnlyARunningRead() {
        var running = Self.reading()
        #expect(take(running.abandon(.invalidated)) == Step(.end(.invalidated), readEnd: .abandoned))
        #expect(take(running.abandon(.cancelled(.zeros))) == Step(.nothing), "ended once")
        #expect(take(running.readReturned(attempt: 1, .zeros)) == Step(.discardLateResult))

        var waiting = Self.machine()
        _ = waiting.start(dataBytes: Self.pageSize)
        _ = waiting.declinedImmediately()
        #expect(take(waiting.abandon(.cancelled(.poison))) == Step(.end(.cancelled(.poison))))
        #expect(take(waiting.slotGranted()) == Step(.nothing), "an ended fetch is not launched")

        var backingOff = Self.reading()
        _ = backingOff.readReturned(attempt: 1, failureWithRetryAllowed: true, policy: Self.retryTwice)
        #expect(take(backingOff.abandon(.invalidated)) == Step(.end(.invalidated)))
        #expect(take(backingOff.retryDue(attempt: 1)) == Step(.nothing), "an ended fetch is not retried")

        #expect(Machine.Ending.invalidated.waiters == .wake)
        #expect(Machine.Ending.cancelled(.poison).waiters == .fill(.poison))
        #expect(Machine.Ending.installed.waiters == .leave)
        #expect(Machine.Ending.addressSpaceGone.waiters == .leave)
    }

    @Test func aWholeInstallIsOnePart() {
        var machine = Self.installing()
        #expect(machine.nextPart! == (0, 8 * Self.pageSize))
        #expect(take(machine.partInstalled()) == .installed(10..<18))
        #expect(machine.nextPart == nil)
        #expect(take(machine.installFinished(policy: .poison)) == Step(.end(.installed)))
    }

    @Test func aRangeRefusedWholeIsHalvedDownToPagesAndGrowsBackAfterSuccess() {
        let page = Self.pageSize
        let refused = UserfaultError(.notRegistered, operation: .copy)
        var machine = Self.installing()
        #expect(take(machine.partFailed(refused)) == .next)
        #expect(machine.nextPart! == (0, 4 * page))
        #expect(take(machine.partFailed(refused)) == .next)
        #expect(machine.nextPart! == (0, 2 * page))
        #expect(take(machine.partInstalled()) == .installed(10..<12))
        #expect(machine.nextPart! == (2 * page, 4 * page), "doubled after a success")
        #expect(take(machine.partInstalled()) == .installed(12..<16))
        #expect(machine.nextPart! == (6 * page, 2 * page), "clipped to what is left")
        #expect(take(machine.partFailed(refused)) == .next)
        #expect(machine.nextPart! == (6 * page, page))
        #expect(take(machine.partFailed(refused)) == .next, "a page refused alone is left for the failure policy")
        #expect(machine.nextPart! == (7 * page, page))
        #expect(take(machine.partInstalled()) == .installed(17..<18))
        #expect(machine.nextPart == nil)
        #expect(machine.refusal?.code == .notRegistered)
        #expect(take(machine.installFinished(policy: .zeroFill)) == Step(.end(.failed(.zeros))))
    }

    @Test func presentPagesPartialProgressDeferralAndAClosedDescriptor() {
        let page = Self.pageSize
        var machine = Self.installing()
        #expect(take(machine.partFailed(UserfaultError(.tryAgain(bytesCompleted: 3 * page), operation: .copy))) == .installed(10..<13),
                "partial progress counts what went in")
        #expect(machine.nextPart! == (3 * page, 5 * page))
        #expect(take(machine.partFailed(UserfaultError(.pageExists, operation: .copy))) == .alreadyPresent(13))
        #expect(machine.nextPart! == (4 * page, 4 * page))
        #expect(take(machine.partFailed(UserfaultError(.tryAgain(bytesCompleted: 0), operation: .copy))) == .deferred)
        #expect(machine.nextPart! == (4 * page, 4 * page), "a deferred installation resumes where it stopped")
        machine.resumeInstalling()
        #expect(machine.nextPart! == (4 * page, 4 * page))
        #expect(take(machine.partFailed(UserfaultError(.closed, operation: .copy))) == .gone)
        #expect(machine.isFinished)
        #expect(machine.nextPart == nil)
        #expect(take(machine.installFinished(policy: .poison)) == Step(.nothing))
    }

    @Test func oneFillForPoliciesAndCancellation() {
        #expect(PageFill(FailurePolicy.default) == .poison, "the default retries, then poisons")
        #expect(PageFill(FailurePolicy.zeroFill) == .zeros)
        #expect(PageFill(FailurePolicy.retry(attempts: 1, backoff: .zero, then: .retry(attempts: 1, backoff: .zero, then: .zeroFill))) == .zeros)
        #expect(PageFill(CancellationResolution.zeroFill) == .zeros)
        #expect(PageFill(CancellationResolution.poison) == .poison)
    }

    @Test func readSlotsLaunchOrQueueInOrder() {
        var slots = ReadSlots(limit: 2)
        #expect(take(slots.launchOrQueue(1))); slots.take()
        #expect(take(slots.launchOrQueue(2))); slots.take()
        #expect(!take(slots.launchOrQueue(3)))
        #expect(!take(slots.launchOrQueue(4)))
        #expect(slots.waiting == [3, 4])
        #expect(take(slots.nextWaiting()) == nil, "no slot free")
        slots.give()
        #expect(take(slots.nextWaiting()) == 3, "first come, first served")
        slots.take()
        #expect(take(slots.nextWaiting()) == nil)
        slots.give()
        slots.removeAllWaiting()
        #expect(take(slots.nextWaiting()) == nil)
        #expect(slots.active == 1)
    }
}
