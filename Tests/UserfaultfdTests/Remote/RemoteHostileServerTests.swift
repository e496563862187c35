import Foundation
import Testing
import Userfaultfd
import UserfaultfdHTTP

/// A server that is not on the caller's side: redirects to another host must not take the credentials along, and sizes
/// the server makes up must end in a typed error, never in a trap (Tests/Fixtures/range_server.py on loopback).
@Suite("Remote: redirects and hostile sizes", .enabled(if: !remoteTestsSkipped, "UFFD_SKIP_REMOTE_TESTS=1"))
struct RemoteHostileServerTests {
    static let secrets = ["Authorization": "Bearer s3cret", "X-Api-Key": "k3y"]

    static func options(_ change: (inout HTTPRangeProvider.Options) -> Void = { _ in }) -> HTTPRangeProvider.Options {
        var options = HTTPRangeProvider.Options(blockSize: 64 << 10, requestTimeout: .seconds(5), initialBackoff: .milliseconds(20))
        change(&options)
        return options
    }

    /// A URL of `server` answering every request with a redirect to `target`.
    static func redirecting(_ server: FixtureServer, to target: String, status: Int = 302) -> URL {
        let encoded = target.addingPercentEncoding(withAllowedCharacters: .alphanumerics)!
        return URL(string: "\(server.baseURL)/moved?redirect_status=\(status)&redirect_to=\(encoded)")!
    }

    @Test("a redirect to another origin is refused by default: typed error, the other server never contacted",
          .timeLimit(.minutes(1)))
    func crossOriginRedirectRefused() async throws {
        try await withRangeServer(size: 256 << 10) { first in
            try await withRangeServer(size: 256 << 10) { second in
                let url = Self.redirecting(first, to: "\(second.baseURL)/landing")
                let error = await openFailure(url, headers: Self.secrets, options: Self.options())
                #expect(error?.code == .redirectRefused, "\(String(describing: error))")
                #expect(error?.isPermanent == true)
                #expect(error?.attempts == 1, "\(String(describing: error))")
                let stats = try await second.stats()
                // One connection: the /_stats request itself.
                #expect(stats.scenarios.isEmpty && stats.connections <= 1,
                        "the second server was contacted: \(stats.connections) connections, \(stats.scenarios)")
            }
        }
    }

    @Test("a redirect to the same origin is followed, with the headers", .timeLimit(.minutes(1)))
    func sameOriginRedirectFollowed() async throws {
        try await withRangeServer(size: 256 << 10) { server in
            let url = Self.redirecting(server, to: "\(server.baseURL)/landing", status: 307)
            let provider = try await HTTPRangeProvider.open(url: url, headers: Self.secrets, options: Self.options())
            #expect(provider.size == 256 << 10)
            try await withRemoteRegion(provider, failurePolicy: .zeroFill) { region in
                #expect(await readRegion(region, 70_000..<70_100) == Array(server.data[70_000..<70_100]))
            }
            let landing = try #require(try await server.stats().scenario("/landing"))
            #expect(landing.probe == 1 && landing.get >= 1, "\(landing)")
            for headers in landing.headers ?? [] {
                #expect(headers["authorization"] == "Bearer s3cret" && headers["x-api-key"] == "k3y", "\(headers)")
            }
        }
    }

    @Test("redirects to other origins allowed: followed without Authorization or the provider's headers",
          .timeLimit(.minutes(1)))
    func crossOriginRedirectAllowedDropsCredentials() async throws {
        try await withRangeServer(size: 256 << 10) { first in
            try await withRangeServer(size: 256 << 10) { second in
                let url = Self.redirecting(first, to: "\(second.baseURL)/landing")
                let provider = try await HTTPRangeProvider.open(url: url, headers: Self.secrets,
                                                                options: Self.options { $0.redirects = .anyOrigin })
                #expect(provider.size == 256 << 10)
                try await withRemoteRegion(provider, failurePolicy: .zeroFill) { region in
                    #expect(await readRegion(region, 0..<4096) == Array(second.data[0..<4096]))
                }
                let landing = try #require(try await second.stats().scenario("/landing"))
                #expect(landing.probe == 1 && landing.get >= 1, "\(landing)")
                #expect(landing.headers?.count == landing.get + landing.head + (landing.probe ?? 0))
                for headers in landing.headers ?? [] {
                    #expect(headers["authorization"] == nil && headers["x-api-key"] == nil, "credentials leaked: \(headers)")
                    #expect(headers["range"] != nil, "the range must survive the redirect: \(headers)")
                }
                // The first server did get them: they were meant for it.
                let moved = try #require(try await first.stats().scenario("/moved"))
                #expect(moved.headers?.first?["authorization"] == "Bearer s3cret")
            }
        }
    }

    @Test("the redirect policy: same origin only by default; never from https to http", arguments: [
        ("https://a.example/x", "https://a.example:443/y", RedirectCase.follow, RedirectCase.follow),
        ("http://a.example/x", "http://a.example:8080/y", .refuse, .followStripped),
        ("http://a.example/x", "https://a.example/y", .refuse, .followStripped),
        ("https://a.example/x", "http://a.example/y", .refuse, .refuse),
        ("https://a.example/x", "https://b.example/y", .refuse, .followStripped),
        ("https://A.EXAMPLE/x", "https://a.example/y", .follow, .follow),
    ])
    func redirectDecisions(from: String, to: String, byDefault: RedirectCase, anyOrigin: RedirectCase) {
        func decide(_ policy: HTTPRangeProvider.RedirectPolicy) -> RedirectCase {
            switch HTTPRedirectCheck.decide(policy, original: URL(string: from)!, from: URL(string: from)!, to: URL(string: to)!) {
            case .follow(stripCredentials: false): .follow
            case .follow(stripCredentials: true): .followStripped
            case .refuse: .refuse
            }
        }
        #expect(decide(.sameOrigin) == byDefault)
        #expect(decide(.anyOrigin) == anyOrigin)
        #expect(decide(.none) == .refuse)
    }

    enum RedirectCase: Sendable { case follow, followStripped, refuse }

    // MARK: - Sizes

    @Test("a size beyond any address space (2^63 - 1, 2^63 - 808) is a typed error, not a trap",
          .timeLimit(.minutes(1)), arguments: ["9223372036854775807", "9223372036854775000", "72057594037927937"])
    func hostileSize(_ claim: String) async throws {
        try await withRangeServer(size: 64 << 10) { server in
            let error = await openFailure(URL(string: "\(server.baseURL)/huge?claim_size=\(claim)")!, options: Self.options())
            #expect(error?.code == .objectTooLarge, "\(String(describing: error))")
            #expect(error?.isPermanent == true)
        }
    }

    @Test("a Content-Range total that is not a number is badContentRange", .timeLimit(.minutes(1)),
          arguments: ["abc", "-5", "99999999999999999999", "1e3", "12%2034"])
    func garbageContentRange(_ claim: String) async throws {
        try await withRangeServer(size: 64 << 10) { server in
            let error = await openFailure(URL(string: "\(server.baseURL)/garbage?claim_size=\(claim)")!, options: Self.options())
            #expect(error?.code == .badContentRange, "\(String(describing: error))")
        }
    }

    @Test("a 206 whose Content-Length is short of its range is badContentRange, permanent", .timeLimit(.minutes(1)))
    func shortContentLength() async throws {
        try await withRangeServer(size: 256 << 10) { server in
            let provider = try await HTTPRangeProvider.open(url: URL(string: "\(server.baseURL)/short?short_length=1")!,
                                                            options: Self.options { $0.sizeProbe = .rangeGet })
            try await withRemoteRegion(provider, failurePolicy: .zeroFill) { region in
                #expect(await readRegion(region, 0..<4096) == [UInt8](repeating: 0, count: 4096))
                let error = httpError(await nextRegionError(region))
                #expect(error?.code == .badContentRange, "\(String(describing: error))")
                #expect(error?.attempts == 1, "\(String(describing: error))")
            }
        }
    }

    @Test("a version with a size beyond any address space is refused by the initializer")
    func hugeKnownSize() {
        #expect(throws: HTTPRangeError.self) {
            _ = try HTTPRangeProvider(url: URL(string: "http://127.0.0.1:1/x")!, version: HTTPObjectVersion(size: .max))
        }
        #expect(throws: HTTPRangeError.self) {
            _ = try HTTPRangeProvider(url: URL(string: "http://127.0.0.1:1/x")!, version: HTTPObjectVersion(size: -1))
        }
    }
}
