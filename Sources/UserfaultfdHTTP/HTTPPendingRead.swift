import Foundation
import Synchronization
import Userfaultfd

/// One provider read waiting for the blocks it covers: each block read that completes copies its part into the buffer.
///
/// The buffer is written only under the lock and only until the read finishes (completed, failed or cancelled), so a
/// block arriving after the resolver abandoned the read never writes into a buffer that went back to its pool.
final class HTTPPendingRead: Sendable {
    private struct State {
        var remaining: Int
        var outcome: Result<PageContent, any Error>?
        var continuation: CheckedContinuation<PageContent, any Error>?
    }

    let buffer: PageBuffer
    /// Object offset of the buffer's first byte.
    let offset: Int
    /// Bytes of object data the read produces (the rest of the buffer is past the end of the object).
    let length: Int
    private let state: Mutex<State>

    /// A read waiting for `pieces` deliveries.
    init(buffer: PageBuffer, offset: Int, length: Int, pieces: Int) {
        self.buffer = buffer
        self.offset = offset
        self.length = length
        state = Mutex(State(remaining: pieces))
    }

    /// Copies the part of `data` (object bytes from `dataOffset` on) that this read covers; the last piece completes it.
    func deliver(_ data: Data, at dataOffset: Int) {
        let continuation = state.withLock { state -> CheckedContinuation<PageContent, any Error>? in
            guard state.outcome == nil else { return nil }
            let start = max(offset, dataOffset), end = min(offset + length, dataOffset + data.count)
            if start < end {
                data.withUnsafeBytes { bytes in
                    let part = UnsafeRawBufferPointer(rebasing: bytes[(start - dataOffset)..<(end - dataOffset)])
                    buffer.copy(from: part, at: start - offset)
                }
            }
            state.remaining -= 1
            guard state.remaining <= 0 else { return nil }
            state.outcome = .success(.bytes(length))
            defer { state.continuation = nil }
            return state.continuation
        }
        continuation?.resume(returning: .bytes(length))
    }

    /// Ends the read with `error` (nothing more is written to the buffer).
    func fail(_ error: any Error) {
        let continuation = state.withLock { state -> CheckedContinuation<PageContent, any Error>? in
            guard state.outcome == nil else { return nil }
            state.outcome = .failure(error)
            defer { state.continuation = nil }
            return state.continuation
        }
        continuation?.resume(throwing: error)
    }

    /// Whether the read has ended.
    var isFinished: Bool { state.withLock { $0.outcome != nil } }

    /// Hands over the continuation of the waiting `read`; resumes it at once if the read has already ended.
    func arm(_ continuation: CheckedContinuation<PageContent, any Error>) {
        let outcome = state.withLock { state -> Result<PageContent, any Error>? in
            if state.outcome == nil { state.continuation = continuation }
            return state.outcome
        }
        if let outcome { continuation.resume(with: outcome) }
    }
}
