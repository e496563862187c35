import Glibc
import Testing
@testable import Userfaultfd

/// A failed `open`, `mmap` or `pread` is reported as that call, with the path, not as the userfaultfd operation
/// (`register`, `copy`) the library happened to be preparing: `uffd serve --memory /missing` used to say
/// "userfaultfd register failed … cannot open /missing".
@Suite("Errors name the system call that failed")
struct OperationNamingTests {
    @Test("Opening a missing file is an open error naming the path", arguments: ["FileMapping", "MappedFileProvider"])
    func missingFile(opener: String) {
        let path = "/nonexistent-uffd-test-dir/memory.snapshot"
        let error = expectUserfaultError(.system) { () throws(UserfaultError) in
            if opener == "FileMapping" { _ = try FileMapping(path: path) } else { _ = try MappedFileProvider(path: path) }
        }
        #expect(error?.operation.rawValue == "open")
        #expect(error?.errno == ENOENT)
        let text = error?.description ?? ""
        #expect(text.hasPrefix("open failed"), "\(text)")
        #expect(text.contains(path))
        #expect(!text.contains("register"), "\(text)")
    }

    @Test("Anonymous memory that mmap refuses is an mmap error")
    func mmapRefused() {
        // 2^62 bytes: whole pages within Int.max, but more address space than any process has.
        let error = expectUserfaultError(.system) { () throws(UserfaultError) in
            _ = try AnonymousMemory(length: 1 << 62, noReserve: true)
        }
        #expect(error?.operation.rawValue == "mmap")
        #expect(error?.errno == ENOMEM)
        #expect(error?.description.hasPrefix("mmap failed") == true, "\(error?.description ?? "")")
    }

    @Test("A read past the end of a file truncated under the mapping is a pread error naming the path")
    func truncatedRead() throws {
        var template = Array("/tmp/uffd-operation-naming-XXXXXX".utf8CString)
        let descriptor = mkstemp(&template)
        try #require(descriptor >= 0)
        let path = String(cString: template)
        defer { close(descriptor); unlink(path) }
        try #require(ftruncate(descriptor, 8192) == 0)
        let mapping = try FileMapping(path: path)
        try #require(ftruncate(descriptor, 0) == 0)
        let memory = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { memory.deallocate() }
        let error = expectUserfaultError(.fileTruncated) { () throws(UserfaultError) in
            _ = try mapping.read(into: PageBuffer(base: memory, count: 4096), at: 4096)
        }
        #expect(error?.operation.rawValue == "pread")
        #expect(error?.description.hasPrefix("pread failed") == true, "\(error?.description ?? "")")
        #expect(error?.description.contains(path) == true)
    }
}
