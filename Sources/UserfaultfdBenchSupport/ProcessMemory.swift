import Glibc

/// The process's resident set and page tables, from /proc/self/status (zero when it can't be read).
public struct ProcessMemory: Sendable, Equatable {
    /// `VmRSS`: the resident set, in bytes.
    public var residentBytes: Int
    /// `VmPTE`: the page tables, in bytes (not part of the resident set).
    public var pageTableBytes: Int

    /// Both figures.
    public init(residentBytes: Int, pageTableBytes: Int) {
        self.residentBytes = residentBytes
        self.pageTableBytes = pageTableBytes
    }

    /// The figures now.
    public static func read() -> ProcessMemory {
        guard let text = readStatus() else { return ProcessMemory(residentBytes: 0, pageTableBytes: 0) }
        func kilobytes(_ key: String) -> Int {
            for line in text.split(separator: "\n") where line.hasPrefix(key + ":") {
                let digits = line.dropFirst(key.count + 1).filter(\.isNumber)
                return (Int(String(digits)) ?? 0) * 1024
            }
            return 0
        }
        return ProcessMemory(residentBytes: kilobytes("VmRSS"), pageTableBytes: kilobytes("VmPTE"))
    }

    /// /proc/self/status as text (a procfs file has no size to ask for: read until the end).
    private static func readStatus() -> String? {
        let descriptor = open("/proc/self/status", O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { return nil }
        defer { close(descriptor) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = chunk.withUnsafeMutableBytes { Glibc.read(descriptor, $0.baseAddress!, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                return nil
            }
            if count == 0 { break }
            bytes += chunk[..<count]
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
