import Foundation
import Testing
import UffdTool
import Userfaultfd
import UserfaultfdHTTP

/// Remote memory from S3: moto's server on loopback, a presigned GET URL, a LazyRegion over it.
@Suite("Remote: S3 presigned URLs (moto)", .enabled(if: !remoteTestsSkipped, "UFFD_SKIP_REMOTE_TESTS=1"))
struct RemoteS3Tests {
    @Test("random slices of a presigned object read through a LazyRegion equal the object; only touched blocks are fetched",
          .timeLimit(.minutes(1)))
    func randomSlices() async throws {
        try await withS3Fixture(size: 4 << 20) { s3 in
            let blockSize = 64 << 10
            let provider = try await HTTPRangeProvider.open(url: URL(string: s3.info["url"] as! String)!,
                                                            options: .init(blockSize: blockSize))
            #expect(provider.size == s3.data.count)
            #expect(provider.version.etag == s3.info["etag"] as? String)
            let probeRequests = provider.requestCount
            var generator = SystemRandomNumberGenerator()
            var slices: [Range<Int>] = []
            for _ in 0..<12 {
                let length = Int.random(in: 1...(100 << 10), using: &generator)
                let start = Int.random(in: 0...(s3.data.count - length), using: &generator)
                slices.append(start..<start + length)
            }
            try await withRemoteRegion(provider) { region in
                for slice in slices {
                    let bytes = await readRegion(region, slice)
                    #expect(bytes == Array(s3.data[slice]), "slice \(slice)")
                }
            }
            let touched = touchedBlocks(slices, blockSize: blockSize)
            let statistics = provider.statistics
            #expect(statistics.blocksFetched == touched.count, "\(statistics)")
            // A retry (a request that timed out on a loaded machine) asks for the same block again: not another block.
            #expect(statistics.requests - probeRequests - statistics.retries == touched.count, "only touched blocks: \(statistics)")
            #expect(touched.count < s3.data.count / blockSize)
        }
    }

    @Test("concurrent faults from 8 threads on one presigned object", .timeLimit(.minutes(1)))
    func concurrentThreads() async throws {
        try await withS3Fixture(size: 2 << 20) { s3 in
            let provider = try await HTTPRangeProvider.open(url: URL(string: s3.info["url"] as! String)!,
                                                            options: .init(blockSize: 128 << 10))
            try await withRemoteRegion(provider) { region in
                let chunk = s3.data.count / 8
                let results = await withTaskGroup(of: (Int, Bool).self) { group in
                    for index in 0..<8 {
                        group.addTask {
                            let range = index * chunk..<(index + 1) * chunk
                            return (index, await readRegion(region, range) == Array(s3.data[range]))
                        }
                    }
                    return await group.reduce(into: [Int: Bool]()) { $0[$1.0] = $1.1 }
                }
                #expect(results.values.allSatisfy { $0 }, "\(results)")
            }
            #expect(provider.statistics.blocksFetched == 16, "\(provider.statistics)")
        }
    }

    @Test("a presigned URL of a missing key: open throws a permanent 404")
    func missingKey() async throws {
        try await withS3Fixture(size: 64 << 10) { s3 in
            let error = await openFailure(URL(string: s3.info["missing_url"] as! String)!, options: .init())
            #expect(error?.code == .status(404), "\(String(describing: error))")
            #expect(error?.isPermanent == true)
            #expect(error?.attempts == 1, "a permanent error is not retried")
            #expect(error.map { !$0.description.contains("X-Amz-Signature") } == true, "the signature stays out of messages")
        }
    }

    @Test("uffd s3-slice writes exactly the slice, fetching only its blocks", .timeLimit(.minutes(1)))
    func s3SliceCommand() async throws {
        try await withS3Fixture(size: 3 << 20) { s3 in
            let output = FileManager.default.temporaryDirectory.appendingPathComponent("uffd-s3-slice-\(UUID().uuidString)")
            _ = FileManager.default.createFile(atPath: output.path, contents: nil)
            defer { try? FileManager.default.removeItem(at: output) }
            let handle = try FileHandle(forWritingTo: output)
            let offset = 1_000_000, length = 300_000
            let result = try await S3SliceCommand(url: s3.info["url"] as! String, offset: offset, length: length,
                                                  blockSize: 64 << 10, output: handle.fileDescriptor, showStatistics: false).run()
            try handle.close()
            let written = try [UInt8](Data(contentsOf: output))
            #expect(written == Array(s3.data[offset..<offset + length]))
            let blocks = touchedBlocks([offset..<offset + length], blockSize: 64 << 10)
            #expect(result.provider.blocksFetched == blocks.count, "\(result.provider)")
            #expect(result.totalBlocks == (s3.data.count + (64 << 10) - 1) / (64 << 10))
        }
    }

    @Test("uffd cat URL equals the object", .timeLimit(.minutes(1)))
    func catURL() async throws {
        try await withS3Fixture(size: (2 << 20) + 12_345) { s3 in
            let output = FileManager.default.temporaryDirectory.appendingPathComponent("uffd-cat-url-\(UUID().uuidString)")
            _ = FileManager.default.createFile(atPath: output.path, contents: nil)
            defer { try? FileManager.default.removeItem(at: output) }
            let handle = try FileHandle(forWritingTo: output)
            let statistics = try await CatCommand(path: s3.info["url"] as! String, output: handle.fileDescriptor,
                                                  showProgress: false).run()
            try handle.close()
            #expect(try [UInt8](Data(contentsOf: output)) == s3.data)
            #expect((statistics?.faults ?? 0) > 0)
        }
    }
}
