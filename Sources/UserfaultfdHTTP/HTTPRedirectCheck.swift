import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Userfaultfd

/// Decides whether a redirect is followed, and prepares the redirected request: on Linux, URLSession copies every header
/// of the original request into the redirected one, credentials included, whatever the target host.
package struct HTTPRedirectCheck: Sendable {
    package enum Decision: Sendable, Hashable {
        /// Follow; with `stripCredentials`, without the credentials meant for the original origin.
        case follow(stripCredentials: Bool)
        case refuse
    }

    let policy: HTTPRangeProvider.RedirectPolicy
    /// Lowercased names of the headers that stay with the original origin: the provider's headers and the usual
    /// credentials.
    let privateHeaders: Set<String>

    init(policy: HTTPRangeProvider.RedirectPolicy, headers: [String: String]) {
        self.policy = policy
        privateHeaders = Set(headers.keys.map { $0.lowercased() } + ["authorization", "proxy-authorization", "cookie"])
    }

    /// The decision for a hop from `from` to `to` of a request first sent to `original`.
    package static func decide(_ policy: HTTPRangeProvider.RedirectPolicy, original: URL, from: URL, to: URL) -> Decision {
        if from.scheme?.lowercased() == "https", to.scheme?.lowercased() != "https" { return .refuse }
        guard let scheme = to.scheme?.lowercased(), scheme == "http" || scheme == "https" else { return .refuse }
        let same = Origin(original) == Origin(to)
        switch policy {
        case .none: return .refuse
        case .sameOrigin: return same ? .follow(stripCredentials: false) : .refuse
        case .anyOrigin: return .follow(stripCredentials: !same)
        }
    }

    /// The request to send for the redirect from `response` to `proposed`, or the error that refuses it.
    func redirect(original: URLRequest, response: HTTPURLResponse, proposed: URLRequest) -> Result<URLRequest, HTTPRangeError> {
        let address = original.url?.absoluteString ?? ""
        guard let originalURL = original.url, let target = proposed.url else {
            return .failure(HTTPRangeError(.redirectRefused, url: address, detail: "\(response.statusCode) without a usable Location"))
        }
        let from = response.url ?? originalURL
        switch Self.decide(policy, original: originalURL, from: from, to: target) {
        case .refuse:
            let why = from.scheme?.lowercased() == "https" && target.scheme?.lowercased() != "https"
                ? "from https to \(target.scheme ?? "?")"
                : policy == .none ? "redirects are not followed" : "another origin; Options.redirects is \(policy)"
            return .failure(HTTPRangeError(.redirectRefused, url: address,
                                           detail: "\(response.statusCode) to \(HTTPRangeError.redacted(target.absoluteString)): \(why)"))
        case .follow(stripCredentials: false):
            return .success(proposed)
        case .follow(stripCredentials: true):
            var request = proposed
            for name in (proposed.allHTTPHeaderFields ?? [:]).keys where privateHeaders.contains(name.lowercased()) {
                request.setValue(nil, forHTTPHeaderField: name)
            }
            return .success(request)
        }
    }

    /// Scheme, host and port, the port made explicit.
    private struct Origin: Hashable {
        let scheme: String?
        let host: String?
        let port: Int?

        init(_ url: URL) {
            scheme = url.scheme?.lowercased()
            host = url.host?.lowercased()
            port = url.port ?? (scheme == "https" ? 443 : scheme == "http" ? 80 : nil)
        }
    }
}
