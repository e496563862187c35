import Userfaultfd

/// An ``HTTPRangeProvider`` request failed: what went wrong, for which URL and bytes, after how many attempts.
///
/// Conforms to `ProviderFailure`: errors that another attempt cannot fix (403, 404, 416, an object replaced since it was
/// opened, a server that ignores ranges) are ``isPermanent``, so a `FaultResolver` skips its own retries and applies
/// the region's `FailurePolicy` at once. Transient errors (timeouts, dropped connections, 429, 5xx) have already been
/// retried by the provider (``HTTPRangeProvider/Options/maxAttempts``) when they reach the resolver.
///
/// The URL in messages has its query removed: presigned URLs carry their signature there.
public struct HTTPRangeError: Error, Sendable, Hashable, CustomStringConvertible, ProviderFailure {
    /// What went wrong.
    public enum Code: Sendable, Hashable {
        /// The server answered with an HTTP status the request cannot use (403, 404, 416, 5xx after retries, ...).
        case status(Int)
        /// The object changed since it was opened: `412 Precondition Failed` on the pinned version, or a response whose
        /// ETag, Last-Modified or total size differs from the pinned one.
        case objectChanged
        /// A `206` whose `Content-Range` is missing, unparsable, or not the range that was asked for, or whose
        /// `Content-Length` disagrees with it.
        case badContentRange
        /// The server sent the whole object (`200`) for a range request, and the object is too large to take whole
        /// (``HTTPRangeProvider/Options/wholeObjectLimit``).
        case fullBodyForRange
        /// The size of the object could not be found (no total in `Content-Range`), or a size given is negative.
        case missingSize
        /// The server claims a size larger than ``HTTPRangeProvider/maximumObjectSize`` (more than any process can map).
        case objectTooLarge
        /// The server redirected the request somewhere ``HTTPRangeProvider/Options/redirects`` does not allow: another
        /// origin (by default), or from `https` to `http` (always). The detail names the target.
        case redirectRefused
        /// The body ended before the promised number of bytes (e.g. the connection dropped mid-body).
        case truncatedBody
        /// No complete answer within the per-request timeout.
        case timeout
        /// The connection failed (refused, reset, dropped, TLS...): the transport's own description.
        case transport(String)
        /// The URL is not an `http` or `https` URL.
        case invalidURL
        /// The waiting task was cancelled.
        case cancelled
    }

    /// What went wrong.
    public var code: Code
    /// The URL, without its query string (which may hold a signature).
    public var url: String
    /// The object bytes asked for, if the request was a range request.
    public var range: ClosedRange<Int>?
    /// How many requests were made for this read before giving up.
    public var attempts: Int
    /// More about the failure (a header's value, the expected and received sizes...).
    public var detail: String?

    /// An error for `url` (its query is dropped from messages).
    public init(_ code: Code, url: String, range: ClosedRange<Int>? = nil, attempts: Int = 1, detail: String? = nil) {
        self.code = code
        self.url = Self.redacted(url)
        self.range = range
        self.attempts = attempts
        self.detail = detail
    }

    /// Whether another attempt would fail the same way: client errors other than 408 and 429 (403, 404, 416...), 501 and
    /// 505, a changed object, a server that does not serve ranges or answers with the wrong range, an unknown or
    /// impossible size, a refused redirect, an invalid URL.
    public var isPermanent: Bool {
        switch code {
        case .status(let status):
            return Self.isPermanent(status: status)
        case .objectChanged, .badContentRange, .fullBodyForRange, .missingSize, .objectTooLarge, .redirectRefused, .invalidURL:
            return true
        case .truncatedBody, .timeout, .transport, .cancelled:
            return false
        }
    }

    /// Whether an HTTP status is worth retrying: 408, 429 and 5xx except 501 and 505.
    static func isPermanent(status: Int) -> Bool {
        switch status {
        case 408, 429: false
        case 501, 505: true
        case 500...599: false
        default: true
        }
    }

    /// The request, the bytes, what went wrong, the attempts, and whether it is permanent.
    public var description: String {
        var text = "GET \(url)"
        if let range { text += " bytes \(range.lowerBound)-\(range.upperBound)" }
        text += ": "
        switch code {
        case .status(let status): text += "HTTP \(status)\(Self.reason(status).map { " \($0)" } ?? "")"
        case .objectChanged: text += "the object changed since it was opened"
        case .badContentRange: text += "the response's Content-Range does not match the range asked for"
        case .fullBodyForRange: text += "the server sent the whole object for a range request (it does not serve ranges)"
        case .missingSize: text += "the object's size is unknown (no Content-Range total) or negative"
        case .objectTooLarge: text += "the server claims a size larger than any process can map"
        case .redirectRefused: text += "redirect refused"
        case .truncatedBody: text += "the body ended early"
        case .timeout: text += "no complete answer within the request timeout"
        case .transport(let message): text += "connection failed: \(message)"
        case .invalidURL: text += "not an http or https URL"
        case .cancelled: text += "cancelled"
        }
        if let detail { text += " (\(detail))" }
        if attempts > 1 { text += " after \(attempts) attempts" }
        if isPermanent { text += "; permanent" }
        return text
    }

    static func reason(_ status: Int) -> String? {
        switch status {
        case 400: "Bad Request"
        case 401: "Unauthorized"
        case 403: "Forbidden"
        case 404: "Not Found"
        case 405: "Method Not Allowed"
        case 408: "Request Timeout"
        case 410: "Gone"
        case 412: "Precondition Failed"
        case 416: "Range Not Satisfiable"
        case 429: "Too Many Requests"
        case 500: "Internal Server Error"
        case 501: "Not Implemented"
        case 502: "Bad Gateway"
        case 503: "Service Unavailable"
        case 504: "Gateway Timeout"
        default: nil
        }
    }

    /// `url` without its query and fragment.
    static func redacted(_ url: String) -> String {
        guard let cut = url.firstIndex(where: { $0 == "?" || $0 == "#" }) else { return url }
        return String(url[..<cut]) + "?…"
    }
}
