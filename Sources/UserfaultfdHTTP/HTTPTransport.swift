import Dispatch
import Foundation
import Synchronization
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Userfaultfd

/// A complete HTTP response: status, headers and the whole body.
struct HTTPReply: Sendable {
    let response: HTTPURLResponse
    let body: Data

    var status: Int { response.statusCode }

    func header(_ name: String) -> String? { response.value(forHTTPHeaderField: name) }
}

/// Sends requests through one `URLSession` whose callbacks run on a serial queue of its own (never Swift's cooperative
/// pool), each bounded by a timeout of our own, at most `limit` at a time.
///
/// Callback-based on purpose: a provider read waits on a continuation that these callbacks resume, so nothing here needs
/// a task executor, and a thread of the pool blocked on a fault cannot delay an answer. Serial queues on purpose: on
/// Linux, concurrent queues and an `OperationQueue` without an underlying queue run on libdispatch's worker pool, which
/// is also the cooperative pool; when all its threads are blocked on faults, work sent there waits about a second for a
/// new thread. The delegate's `OperationQueue` runs on a serial `DispatchQueue`, and the timeouts and backoffs on
/// `PoolFreeClock`'s timer queue.
final class HTTPTransport: Sendable {
    let session: URLSession
    private let delegate: HTTPSessionDelegate
    let limiter: RequestLimiter
    let counters: HTTPCounters
    /// The delegate queue's underlying queue (the `OperationQueue` does not keep it alive).
    private let sessionQueue = DispatchQueue(label: "userfaultfd.http-range.session")

    /// - Parameter redirects: which redirects are followed, and the headers that never leave the original origin.
    init(maxConcurrentRequests: Int, counters: HTTPCounters, redirects: HTTPRedirectCheck) {
        self.counters = counters
        let configuration = URLSessionConfiguration.ephemeral
        configuration.httpMaximumConnectionsPerHost = maxConcurrentRequests
        configuration.requestCachePolicy = .reloadIgnoringLocalCacheData
        configuration.urlCache = nil
        let queue = OperationQueue()
        queue.name = "userfaultfd.http-range.session"
        queue.maxConcurrentOperationCount = 1
        queue.underlyingQueue = sessionQueue
        delegate = HTTPSessionDelegate(redirects: redirects)
        session = URLSession(configuration: configuration, delegate: delegate, delegateQueue: queue)
        limiter = RequestLimiter(limit: maxConcurrentRequests, counters: counters)
    }

    deinit {
        session.invalidateAndCancel()
    }

    /// Sends `request` now (the caller holds a slot of the limiter). `completion` is called exactly once unless the
    /// returned exchange is cancelled first.
    /// - Parameters:
    ///   - accept: looks at the status and headers before the body arrives; an error stops the transfer.
    ///   - bodyLimit: a body growing past this many bytes stops the transfer with ``HTTPRangeError/Code/fullBodyForRange``.
    func send(
        _ request: URLRequest,
        timeout: Duration,
        bodyLimit: Int,
        accept: @escaping @Sendable (HTTPURLResponse) -> HTTPRangeError?,
        completion: @escaping @Sendable (Result<HTTPReply, HTTPRangeError>) -> Void
    ) -> HTTPExchange {
        var request = request
        request.timeoutInterval = max(1, timeout.inSeconds * 2)  // ours fires first; this only bounds curl's idle wait
        let task = session.dataTask(with: request)
        let url = request.url?.absoluteString ?? ""
        let exchange = HTTPExchange(task: task, delegate: delegate)
        delegate.register(task.taskIdentifier, HTTPSessionDelegate.Pending(
            url: url, bodyLimit: bodyLimit, accept: accept, counters: counters, completion: completion))
        counters.value.withLock { $0.requests += 1 }
        PoolFreeClock.schedule(after: timeout) { [delegate] in
            guard let pending = delegate.remove(task.taskIdentifier) else { return }
            task.cancel()
            pending.completion(.failure(HTTPRangeError(.timeout, url: url, detail: "\(timeout)")))
        }
        task.resume()
        return exchange
    }

    /// Calls `body` after `delay` on the library's timer queue (not the cooperative pool, not libdispatch's workers).
    func after(_ delay: Duration, _ body: @escaping @Sendable () -> Void) {
        PoolFreeClock.schedule(after: delay, body)
    }
}

/// One request on the wire; ``cancel()`` drops it without calling its completion.
struct HTTPExchange: Sendable {
    let task: URLSessionDataTask
    let delegate: HTTPSessionDelegate

    func cancel() {
        if delegate.remove(task.taskIdentifier) != nil { task.cancel() }
    }
}

/// Collects each task's response and body and completes it; the table is the single owner of a pending completion, so
/// the completion runs once, whichever comes first: the end of the transfer, the timeout, or a cancel.
final class HTTPSessionDelegate: NSObject, URLSessionDataDelegate, Sendable {
    struct Pending: Sendable {
        let url: String
        let bodyLimit: Int
        let accept: @Sendable (HTTPURLResponse) -> HTTPRangeError?
        let counters: HTTPCounters
        let completion: @Sendable (Result<HTTPReply, HTTPRangeError>) -> Void
        var response: HTTPURLResponse?
        var body = Data()
        var rejection: HTTPRangeError?
    }

    private let pending = Mutex<[Int: Pending]>([:])
    private let redirects: HTTPRedirectCheck

    init(redirects: HTTPRedirectCheck) {
        self.redirects = redirects
    }

    func register(_ id: Int, _ entry: Pending) {
        pending.withLock { $0[id] = entry }
    }

    func remove(_ id: Int) -> Pending? {
        pending.withLock { $0.removeValue(forKey: id) }
    }

    func urlSession(_ session: URLSession, dataTask: URLSessionDataTask, didReceive response: URLResponse,
                    completionHandler: @escaping (URLSession.ResponseDisposition) -> Void) {
        guard let http = response as? HTTPURLResponse else {
            let rejected = pending.withLock { table -> Bool in
                guard let entry = table[dataTask.taskIdentifier] else { return false }
                table[dataTask.taskIdentifier]?.rejection = HTTPRangeError(.transport("not an HTTP response"), url: entry.url)
                return true
            }
            completionHandler(rejected ? .cancel : .allow)
            return
        }
        let rejection = pending.withLock { table -> HTTPRangeError? in
            guard let entry = table[dataTask.taskIdentifier] else { return nil }
            table[dataTask.taskIdentifier]?.response = http
            let rejection = entry.rejection ?? entry.accept(http)  // a refused redirect delivers its own response
            table[dataTask.taskIdentifier]?.rejection = rejection
            if rejection == nil, http.expectedContentLength > 0 {
                table[dataTask.taskIdentifier]?.body.reserveCapacity(Int(min(http.expectedContentLength, Int64(entry.bodyLimit))))
            }
            return rejection
        }
        completionHandler(rejection == nil ? .allow : .cancel)
        if rejection != nil { dataTask.cancel() }
    }

    /// Follows the redirect only where ``HTTPRedirectCheck`` allows it (stripping credentials for another origin);
    /// otherwise the task ends with ``HTTPRangeError/Code/redirectRefused`` and nothing is sent to the target.
    func urlSession(_ session: URLSession, task: URLSessionTask, willPerformHTTPRedirection response: HTTPURLResponse,
                    newRequest request: URLRequest, completionHandler: @escaping (URLRequest?) -> Void) {
        guard let original = task.originalRequest else {
            completionHandler(nil)
            task.cancel()
            return
        }
        switch redirects.redirect(original: original, response: response, proposed: request) {
        case .success(let next):
            completionHandler(next)
        case .failure(let error):
            pending.withLock { table in
                if table[task.taskIdentifier] != nil { table[task.taskIdentifier]?.rejection = error }
            }
            completionHandler(nil)
            task.cancel()
        }
    }

    func urlSession(_ session: URLSession, dataTask: URLSessionDataTask, didReceive data: Data) {
        let stop = pending.withLock { table -> Bool in
            guard var entry = table.removeValue(forKey: dataTask.taskIdentifier) else { return false }
            defer { table[dataTask.taskIdentifier] = entry }
            guard entry.rejection == nil else { return true }  // refused: the body is not wanted
            entry.body.append(data)
            entry.counters.value.withLock { $0.bytesReceived += data.count }
            guard entry.body.count > entry.bodyLimit else { return false }
            entry.rejection = HTTPRangeError(.fullBodyForRange, url: entry.url, detail: "more than \(entry.bodyLimit) bytes in the body")
            return true
        }
        if stop { dataTask.cancel() }
    }

    func urlSession(_ session: URLSession, task: URLSessionTask, didCompleteWithError error: (any Error)?) {
        guard let entry = remove(task.taskIdentifier) else { return }  // timed out or cancelled: already answered
        if let rejection = entry.rejection {
            entry.completion(.failure(rejection))
        } else if let error {
            entry.completion(.failure(Self.transportError(error, url: entry.url)))
        } else if let response = entry.response ?? task.response as? HTTPURLResponse {
            entry.completion(.success(HTTPReply(response: response, body: entry.body)))
        } else {
            entry.completion(.failure(HTTPRangeError(.transport("no HTTP response"), url: entry.url)))
        }
    }

    static func transportError(_ error: any Error, url: String) -> HTTPRangeError {
        guard let urlError = error as? URLError else {
            return HTTPRangeError(.transport(String(describing: error)), url: url)
        }
        switch urlError.code {
        case .timedOut:
            return HTTPRangeError(.timeout, url: url, detail: "reported by the transport")
        case .badURL, .unsupportedURL:
            return HTTPRangeError(.invalidURL, url: url)
        default:
            return HTTPRangeError(.transport("\(urlError.localizedDescription) [URLError \(urlError.code.rawValue)]"), url: url)
        }
    }
}

/// The provider's counters, shared by its transport and its block reads.
final class HTTPCounters: Sendable {
    let value = Mutex(HTTPRangeProvider.Statistics())
}

/// At most `limit` requests in flight: the others wait in line, first come first served.
final class RequestLimiter: Sendable {
    private struct State {
        var active = 0
        var waiting: [@Sendable () -> Void] = []
    }

    let limit: Int
    private let state = Mutex(State())
    private let counters: HTTPCounters

    init(limit: Int, counters: HTTPCounters) {
        self.limit = max(1, limit)
        self.counters = counters
    }

    /// Runs `start` once a slot is free (at once if one is); `start` must lead to exactly one ``release()``.
    func acquire(_ start: @escaping @Sendable () -> Void) {
        let now = state.withLock { state -> Int? in
            guard state.active < limit else {
                state.waiting.append(start)
                return nil
            }
            state.active += 1
            return state.active
        }
        if let now {
            counters.value.withLock { $0.peakConcurrentRequests = max($0.peakConcurrentRequests, now) }
            start()
        }
    }

    /// Frees a slot, or hands it to the next in line.
    func release() {
        let next = state.withLock { state -> (@Sendable () -> Void)? in
            if state.waiting.isEmpty {
                state.active -= 1
                return nil
            }
            return state.waiting.removeFirst()
        }
        next?()
    }
}

extension Duration {
    /// The duration in seconds, as a Double.
    var inSeconds: Double {
        Double(components.seconds) + Double(components.attoseconds) / 1e18
    }
}
