import Foundation
import Synchronization
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// Finds the size and version of a remote object: `HEAD`, or when that is refused or says nothing usable, a `GET` of
/// bytes 0-0 (`206` with `Content-Range: bytes 0-0/SIZE`; `416` with `bytes */0` for an empty object; a `200` with the
/// whole body when the server ignores ranges, kept if it is small enough).
struct HTTPSizeProbe: Sendable {
    let url: URL
    let headers: [String: String]
    let options: HTTPRangeProvider.Options
    let transport: HTTPTransport

    func run() async throws(HTTPRangeError) -> (version: HTTPObjectVersion, whole: Data?) {
        if options.sizeProbe == .automatic {
            switch await send(method: "HEAD", range: nil, bodyLimit: 0, validate: { reply in
                reply.status == 200 ? nil : HTTPRangeError(.status(reply.status), url: url.absoluteString, detail: "HEAD")
            }) {
            case .success(let reply):
                if let size = Self.contentLength(reply) { return (version(of: reply, size: size), nil) }
            case .failure(let error):
                // A refused HEAD (403 on a presigned GET URL, 405, 501...) may still allow GET; a dead server does not.
                guard case .status = error.code else { throw error }
            }
        }
        let address = url.absoluteString, limit = options.wholeObjectLimit
        let reply = try await send(
            method: "GET", range: 0...0, bodyLimit: limit,
            accept: { response in
                guard response.statusCode == 200, response.expectedContentLength > Int64(limit) else { return nil }
                return HTTPRangeError(.fullBodyForRange, url: address, range: 0...0,
                                      detail: "\(response.expectedContentLength) bytes, more than the \(limit) taken whole")
            },
            validate: { reply in
                switch reply.status {
                case 200, 206: nil
                case 416 where reply.header("Content-Range").flatMap(HTTPContentRange.init)?.total == 0: nil
                default: HTTPRangeError(.status(reply.status), url: address, range: 0...0)
                }
            }).get()
        switch reply.status {
        case 200:
            return (version(of: reply, size: reply.body.count), reply.body)
        case 416:
            return (version(of: reply, size: 0), nil)
        default:
            guard let header = reply.header("Content-Range"), let contentRange = HTTPContentRange(header) else {
                throw HTTPRangeError(.badContentRange, url: address, range: 0...0, detail: "Content-Range: \(reply.header("Content-Range") ?? "(none)")")
            }
            guard let total = contentRange.total else {
                throw HTTPRangeError(.missingSize, url: address, range: 0...0, detail: "Content-Range: \(header)")
            }
            return (version(of: reply, size: total), nil)
        }
    }

    private func version(of reply: HTTPReply, size: Int) -> HTTPObjectVersion {
        HTTPObjectVersion(size: size, etag: reply.header("ETag"), lastModified: reply.header("Last-Modified"))
    }

    private static func contentLength(_ reply: HTTPReply) -> Int? {
        if let text = reply.header("Content-Length"), let length = Int(text.trimmingCharacters(in: .whitespaces)), length >= 0 {
            return length
        }
        return reply.response.expectedContentLength >= 0 ? Int(reply.response.expectedContentLength) : nil
    }

    /// One request with the provider's retries, awaited; cancelling the task abandons it.
    private func send(
        method: String, range: ClosedRange<Int>?, bodyLimit: Int,
        accept: @escaping @Sendable (HTTPURLResponse) -> HTTPRangeError? = { _ in nil },
        validate: @escaping @Sendable (HTTPReply) -> HTTPRangeError?
    ) async -> Result<HTTPReply, HTTPRangeError> {
        var request = URLRequest(url: url)
        request.httpMethod = method
        for (name, value) in headers { request.setValue(value, forHTTPHeaderField: name) }
        if let range { request.setValue("bytes=\(range.lowerBound)-\(range.upperBound)", forHTTPHeaderField: "Range") }
        request.setValue("identity", forHTTPHeaderField: "Accept-Encoding")
        let outcome = HTTPOutcome()
        let exchange = HTTPRetryingRequest(transport: transport, options: options, request: request, range: range,
                                           bodyLimit: bodyLimit, accept: accept, validate: validate,
                                           completion: { outcome.set($0) })
        exchange.start()
        let address = url.absoluteString
        return await withTaskCancellationHandler {
            await outcome.value()
        } onCancel: {
            exchange.cancel()
            outcome.set(.failure(HTTPRangeError(.cancelled, url: address, range: range)))
        }
    }
}

/// A result handed from a callback to one awaiting task; the first `set` wins.
final class HTTPOutcome: Sendable {
    private struct State {
        var result: Result<HTTPReply, HTTPRangeError>?
        var waiter: CheckedContinuation<Result<HTTPReply, HTTPRangeError>, Never>?
    }

    private let state = Mutex(State())

    func set(_ result: Result<HTTPReply, HTTPRangeError>) {
        let waiter = state.withLock { state -> CheckedContinuation<Result<HTTPReply, HTTPRangeError>, Never>? in
            guard state.result == nil else { return nil }
            state.result = result
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume(returning: result)
    }

    func value() async -> Result<HTTPReply, HTTPRangeError> {
        await withCheckedContinuation { continuation in
            let result = state.withLock { state -> Result<HTTPReply, HTTPRangeError>? in
                if state.result == nil { state.waiter = continuation }
                return state.result
            }
            if let result { continuation.resume(returning: result) }
        }
    }
}

/// A parsed `Content-Range` header: `bytes FIRST-LAST/TOTAL`, `bytes FIRST-LAST/*` or `bytes */TOTAL`.
struct HTTPContentRange: Sendable, Hashable {
    var first: Int?
    var last: Int?
    var total: Int?

    init?(_ header: String) {
        let text = header.trimmingCharacters(in: .whitespaces)
        guard text.lowercased().hasPrefix("bytes ") else { return nil }
        let value = text.dropFirst(6).trimmingCharacters(in: .whitespaces)
        let parts = value.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2 else { return nil }
        if parts[1] == "*" {
            total = nil
        } else {
            guard let total = Int(parts[1]), total >= 0 else { return nil }
            self.total = total
        }
        if parts[0] == "*" {
            guard total != nil else { return nil }
            return
        }
        let bounds = parts[0].split(separator: "-", omittingEmptySubsequences: false)
        guard bounds.count == 2, let first = Int(bounds[0]), let last = Int(bounds[1]), first >= 0, last >= first else { return nil }
        if let total, last >= total { return nil }
        self.first = first
        self.last = last
    }
}
