import Foundation
import Synchronization
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Userfaultfd

/// Finds the size and version of a remote object with a `GET` of bytes 0-0: `206` with `Content-Range: bytes 0-0/SIZE`;
/// `416` with `bytes */0` for an empty object; a `200` with the whole body when the server ignores ranges, kept if it is
/// small enough.
///
/// No `HEAD`: FoundationNetworking on Linux converts every `Content-Length` through a `Double` and traps on 2^63 − 1, so a
/// hostile server could kill the process with a HEAD's size. The size comes from the `Content-Range` total, which is
/// parsed here and checked against ``HTTPRangeProvider/maximumObjectSize`` before any arithmetic.
struct HTTPSizeProbe: Sendable {
    let url: URL
    let headers: [String: String]
    let options: HTTPRangeProvider.Options
    let transport: HTTPTransport

    func run() async throws(HTTPRangeError) -> (version: HTTPObjectVersion, whole: Data?) {
        let address = url.absoluteString, limit = options.wholeObjectLimit
        let reply = try await send(
            method: "GET", range: 0...0, bodyLimit: limit,
            accept: { response in
                if response.statusCode == 206 { return Self.lengthMismatch(response, range: 0...0, url: address) }
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
            let header = reply.header("Content-Range")
            guard let header, let contentRange = HTTPContentRange(header), contentRange.first == 0, contentRange.last == 0 else {
                throw HTTPRangeError(.badContentRange, url: address, range: 0...0, detail: "Content-Range: \(header ?? "(none)")")
            }
            guard let total = contentRange.total else {
                throw HTTPRangeError(.missingSize, url: address, range: 0...0, detail: "Content-Range: \(header)")
            }
            try HTTPRangeProvider.checkSize(total, url: address, range: 0...0)
            guard reply.body.count == 1 else {
                throw HTTPRangeError(.badContentRange, url: address, range: 0...0, detail: "\(reply.body.count) bytes for bytes 0-0")
            }
            return (version(of: reply, size: total), nil)
        }
    }

    /// An error if a `206`'s `Content-Length` (when it has one) is not the length of `range`.
    static func lengthMismatch(_ response: HTTPURLResponse, range: ClosedRange<Int>, url: String) -> HTTPRangeError? {
        let length = response.expectedContentLength
        guard length >= 0, length != Int64(range.count) else { return nil }
        return HTTPRangeError(.badContentRange, url: url, range: range, detail: "Content-Length \(length) for \(range.count) bytes")
    }

    private func version(of reply: HTTPReply, size: Int) -> HTTPObjectVersion {
        HTTPObjectVersion(size: size, etag: reply.header("ETag"), lastModified: reply.header("Last-Modified"))
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
