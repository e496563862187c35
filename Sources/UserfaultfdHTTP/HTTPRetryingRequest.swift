import Foundation
import Synchronization
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Userfaultfd

/// One logical request (a block read or a size probe) and its retries: each attempt waits for a slot of the limiter,
/// has its own timeout, and a failure that may be transient (timeout, connection error, truncated body, 408, 429, 5xx)
/// is tried again after an exponential backoff with jitter, or after the server's `Retry-After`.
final class HTTPRetryingRequest: Sendable {
    private struct State {
        var attempts = 0
        var exchange: HTTPExchange?
        var finished = false
    }

    private let transport: HTTPTransport
    private let options: HTTPRangeProvider.Options
    private let request: URLRequest
    private let range: ClosedRange<Int>?
    private let bodyLimit: Int
    private let accept: @Sendable (HTTPURLResponse) -> HTTPRangeError?
    private let validate: @Sendable (HTTPReply) -> HTTPRangeError?
    private let completion: @Sendable (Result<HTTPReply, HTTPRangeError>) -> Void
    private let state = Mutex(State())

    /// - Parameters:
    ///   - accept: checks status and headers before the body is received (an error stops the transfer).
    ///   - validate: checks the complete reply; nil when it is usable.
    ///   - completion: called once with the usable reply or the last error (unless ``cancel()`` came first).
    init(
        transport: HTTPTransport,
        options: HTTPRangeProvider.Options,
        request: URLRequest,
        range: ClosedRange<Int>?,
        bodyLimit: Int,
        accept: @escaping @Sendable (HTTPURLResponse) -> HTTPRangeError? = { _ in nil },
        validate: @escaping @Sendable (HTTPReply) -> HTTPRangeError?,
        completion: @escaping @Sendable (Result<HTTPReply, HTTPRangeError>) -> Void
    ) {
        self.transport = transport
        self.options = options
        self.request = request
        self.range = range
        self.bodyLimit = bodyLimit
        self.accept = accept
        self.validate = validate
        self.completion = completion
    }

    /// Sends the first attempt (when a slot is free).
    func start() {
        transport.limiter.acquire { [self] in attempt() }
    }

    /// Drops the request: no further attempt, no completion.
    func cancel() {
        let exchange = state.withLock { state -> HTTPExchange? in
            state.finished = true
            return state.exchange
        }
        exchange?.cancel()
    }

    /// Runs with a slot of the limiter held.
    private func attempt() {
        let proceed = state.withLock { state -> Bool in
            guard !state.finished else { return false }
            state.attempts += 1
            return true
        }
        guard proceed else {
            transport.limiter.release()
            return
        }
        let exchange = transport.send(request, timeout: options.requestTimeout, bodyLimit: bodyLimit, accept: accept) { [self] result in
            transport.limiter.release()
            switch result {
            case .success(let reply):
                if let error = validate(reply) {
                    failed(error, retryAfter: retryAfter(in: reply))
                } else {
                    finish(.success(reply))
                }
            case .failure(let error):
                failed(error, retryAfter: nil)
            }
        }
        state.withLock { $0.exchange = exchange }
    }

    private func failed(_ error: HTTPRangeError, retryAfter: Duration?) {
        var error = error
        let attempts = state.withLock { $0.attempts }
        error.attempts = attempts
        if error.range == nil { error.range = range }
        guard !error.isPermanent, attempts < options.effectiveMaxAttempts else {
            finish(.failure(error))
            return
        }
        var delay = options.backoff(beforeRetry: attempts)
        if let retryAfter {
            guard retryAfter <= options.maxRetryAfter else {
                error.detail = [error.detail, "Retry-After \(retryAfter) is longer than the \(options.maxRetryAfter) allowed"]
                    .compactMap { $0 }.joined(separator: "; ")
                finish(.failure(error))
                return
            }
            delay = max(delay, retryAfter)
        }
        transport.counters.value.withLock { $0.retries += 1 }
        transport.after(delay) { [self] in
            transport.limiter.acquire { [self] in attempt() }
        }
    }

    private func finish(_ result: Result<HTTPReply, HTTPRangeError>) {
        let first = state.withLock { state -> Bool in
            defer { state.finished = true }
            return !state.finished
        }
        if first { completion(result) }
    }

    /// The `Retry-After` of a 429 or 503 reply: delay-seconds or an HTTP date.
    private func retryAfter(in reply: HTTPReply) -> Duration? {
        guard reply.status == 429 || reply.status == 503, let value = reply.header("Retry-After")?.trimmingCharacters(in: .whitespaces) else {
            return nil
        }
        if let seconds = Int(value) { return .seconds(max(0, seconds)) }
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss zzz"
        guard let date = formatter.date(from: value) else { return nil }
        // A date from the server: clamp before converting (Int(Double) traps out of range); a year is plenty.
        let milliseconds = date.timeIntervalSinceNow * 1000
        guard milliseconds.isFinite else { return nil }
        return .milliseconds(Int(min(max(0, milliseconds), 366 * 86_400_000)))
    }
}
