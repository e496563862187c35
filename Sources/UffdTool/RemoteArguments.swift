import Foundation

/// Options of the commands that read remote objects (`cat URL`, `s3-slice`).
extension ArgumentList {
    /// Every `--header "Name: value"` (repeatable), removed from the list.
    mutating func headers() throws -> [String: String] {
        var headers: [String: String] = [:]
        while let text = try value("--header") {
            guard let colon = text.firstIndex(of: ":"), colon != text.startIndex else {
                throw ToolError("--header takes \"Name: value\", not '\(text)'")
            }
            let name = text[..<colon].trimmingCharacters(in: .whitespaces)
            headers[name] = text[text.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        return headers
    }

    /// `--block-size BYTES` (at least 4096), or nil when absent.
    mutating func blockSize() throws -> Int? {
        guard let text = try value("--block-size") else { return nil }
        guard let bytes = Int(text), bytes >= 4096, bytes <= 1 << 30 else {
            throw ToolError("--block-size takes a byte count from 4096 to 1 GiB, not '\(text)'")
        }
        return bytes
    }
}
