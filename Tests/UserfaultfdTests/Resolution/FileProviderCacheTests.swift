import CUserfaultfdTestSupport
import Foundation
import Glibc
import Testing
@testable import Userfaultfd

extension ResolutionTests {
    /// `FileProvider` reads what the page cache holds inside the event handler (`preadv2(RWF_NOWAIT)`) and sends only
    /// the rest to its queues. Eviction is real: the test file is written, `fsync`ed and dropped from the cache with
    /// `posix_fadvise(DONTNEED)`, and `mincore` of a mapping of it confirms what is and is not cached.
    @Suite("FileProvider: page-cache reads in the event handler")
    struct FileProviderCache {
        static let length = 1 << 20

        /// A file of seeded bytes with the pages in `uncached` (page indices) dropped from the page cache.
        static func file(uncached: Range<Int>, name: String) throws -> (ScratchFile, [UInt8]) {
            let bytes = SeededBytes.make(count: length, seed: 0x5eed_cafe)
            let file = try ScratchFile(bytes: bytes, name: name)
            let descriptor = open(file.path, O_RDONLY)
            guard descriptor >= 0 else { throw TestFailure("open \(file.path): errno \(errno)") }
            defer { close(descriptor) }
            fsync(descriptor)
            if !uncached.isEmpty {
                // Drop the whole file (a partial DONTNEED leaves large folios that straddle its edge), then read the
                // pages that should stay cached back in without kernel readahead.
                let status = posix_fadvise(descriptor, 0, 0, POSIX_FADV_DONTNEED)
                guard status == 0 else { throw TestFailure("posix_fadvise(DONTNEED): \(status)") }
                _ = posix_fadvise(descriptor, 0, 0, POSIX_FADV_RANDOM)
                var page = [UInt8](repeating: 0, count: systemPageSize)
                for index in 0..<(length / systemPageSize) where !uncached.contains(index) {
                    guard pread(descriptor, &page, systemPageSize, off_t(index * systemPageSize)) == systemPageSize else {
                        throw TestFailure("pread: errno \(errno)")
                    }
                }
            }
            return (file, bytes)
        }

        /// Which pages of the file are in the page cache (mincore of a shared read-only mapping, which faults nothing).
        static func cachedPages(of path: String) throws -> [Bool] {
            let descriptor = open(path, O_RDONLY)
            guard descriptor >= 0 else { throw TestFailure("open: errno \(errno)") }
            defer { close(descriptor) }
            guard let mapping = mmap(nil, length, PROT_READ, MAP_SHARED, descriptor, 0), mapping != MAP_FAILED else {
                throw TestFailure("mmap: errno \(errno)")
            }
            defer { munmap(mapping, length) }
            var vector = [UInt8](repeating: 0, count: length / systemPageSize)
            guard mincore(mapping, length, &vector) == 0 else { throw TestFailure("mincore: errno \(errno)") }
            return vector.map { $0 & 1 == 1 }
        }

        static func withBuffer<R>(_ count: Int, _ body: (PageBuffer, UnsafeMutableRawPointer) throws -> R) rethrows -> R {
            let memory = UnsafeMutableRawPointer.allocate(byteCount: count, alignment: systemPageSize)
            defer { memory.deallocate() }
            memory.initializeMemory(as: UInt8.self, repeating: 0xEE, count: count)
            return try body(PageBuffer(base: memory, count: count), memory)
        }

        @Test func aCachedRangeIsReadImmediately() throws {
            let (file, bytes) = try Self.file(uncached: 0..<0, name: "uffd-cache-hit")
            defer { file.remove() }
            let provider = try FileProvider(path: file.path)
            try Self.withBuffer(64 << 10) { buffer, memory throws in
                let content = try provider.readImmediately(into: buffer, at: 128 << 10)
                #expect(content == .bytes(64 << 10))
                #expect(Array(UnsafeRawBufferPointer(start: memory, count: 64 << 10)) == Array(bytes[(128 << 10)..<(192 << 10)]))
            }
            #expect(provider.immediateReadCount == 1)
        }

        @Test func anUncachedRangeIsDeclinedAndReadOnAQueue() async throws {
            let pages = Self.length / systemPageSize
            let (file, bytes) = try Self.file(uncached: 0..<pages, name: "uffd-cache-miss")
            defer { file.remove() }
            let cached = try Self.cachedPages(of: file.path)
            try #require(cached.allSatisfy { !$0 }, "posix_fadvise(DONTNEED) left \(cached.filter { $0 }.count) pages cached")
            let provider = try FileProvider(path: file.path)
            let memory = UnsafeMutableRawPointer.allocate(byteCount: 64 << 10, alignment: systemPageSize)
            defer { memory.deallocate() }
            let buffer = PageBuffer(base: memory, count: 64 << 10)
            #expect(try provider.readImmediately(into: buffer, at: 0) == nil)
            #expect(provider.immediateReadCount == 0)
            #expect(try await provider.read(into: buffer, at: 0) == .bytes(64 << 10))
            #expect(Array(UnsafeRawBufferPointer(start: memory, count: 64 << 10)) == Array(bytes[0..<(64 << 10)]))
        }

        @Test func turnedOffEveryReadGoesToAQueue() throws {
            let (file, _) = try Self.file(uncached: 0..<0, name: "uffd-cache-off")
            defer { file.remove() }
            let provider = try FileProvider(path: file.path, readsCachedBytesImmediately: false)
            try Self.withBuffer(4096) { buffer, _ throws in
                #expect(try provider.readImmediately(into: buffer, at: 0) == nil)
            }
        }

        @Test func theEndOfTheFileIsAShortRead() throws {
            let (file, bytes) = try Self.file(uncached: 0..<0, name: "uffd-cache-eof")
            defer { file.remove() }
            let provider = try FileProvider(path: file.path)
            try Self.withBuffer(64 << 10) { buffer, memory throws in
                let content = try provider.readImmediately(into: buffer, at: Self.length - 4096)
                #expect(content == .bytes(4096))
                #expect(Array(UnsafeRawBufferPointer(start: memory, count: 4096)) == Array(bytes[(Self.length - 4096)...]))
            }
        }

        /// Through a region, half of whose file is cached: every byte is right, the cached half was read in the handler
        /// and (some of) the evicted half through the queues.
        @Test(.timeLimit(.minutes(1)))
        func aHalfCachedFileReadsRightThroughARegion() async throws {
            let pages = Self.length / systemPageSize
            let (file, bytes) = try Self.file(uncached: (pages / 2)..<pages, name: "uffd-cache-half")
            defer { file.remove() }
            let cached = try Self.cachedPages(of: file.path)
            try #require(cached[(pages / 2)...].allSatisfy { !$0 }, "the second half stayed cached")
            let provider = try FileProvider(path: file.path)
            try await withFaultWatchdog(seconds: 50) { scope in
                try await withWatchedRegion(scope, length: Self.length, provider: provider,
                                            options: .init(readahead: .none)) { region in
                    guard let read = await finished(copyOnThread(region, offset: 0, length: Self.length),
                                                    releasing: region.uffd) else { return }
                    #expect(read == bytes)
                    let statistics = region.statistics
                    #expect(provider.immediateReadCount >= pages / 2 - 1, "cached pages read in the handler")
                    // The kernel's own readahead behind the first queued pread brings later pages back into the
                    // cache, so only "some" can be promised for the queues.
                    #expect(statistics.providerReads - provider.immediateReadCount >= 1, "evicted pages read on the queues")
                }
            }
        }
    }
}
