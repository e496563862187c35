import Glibc
import Userfaultfd

/// A private anonymous mapping, unmapped when released.
final class AnonymousMapping: @unchecked Sendable {
    // @unchecked: the address is immutable; the memory itself is shared on purpose (it is what faults).
    let address: UInt
    let length: Int

    init(length: Int) throws {
        let pointer = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        guard let pointer, pointer != MAP_FAILED else {
            throw ToolError("mmap of \(length) bytes failed: \(String(cString: strerror(errno)))")
        }
        self.address = UInt(bitPattern: pointer)
        self.length = length
    }

    var pointer: UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: address)! }

    deinit { munmap(pointer, length) }
}

/// An error the tool reports as a message.
struct ToolError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
