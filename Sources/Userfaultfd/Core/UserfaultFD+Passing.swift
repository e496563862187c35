extension UserfaultFD {
    /// Sends this userfaultfd to the peer of `connection` (SCM_RIGHTS), with `payload` in the same message.
    ///
    /// The peer receives its own descriptor for the same userfaultfd; this one stays open. A process that hands its
    /// faults to another keeps its copy so the userfaultfd outlives a crashed handler only as long as it wants to.
    ///
    /// An empty payload goes as one zero byte (a zero-length stream message would lose the descriptor), which
    /// ``receive(from:enabledFeatures:maximumPayload:timeout:)`` gives back as the empty payload; a peer reading the
    /// socket itself sees that byte.
    ///
    /// - Parameters:
    ///   - connection: a connected Unix stream socket.
    ///   - payload: bytes sent in the same message as the descriptor.
    ///   - timeout: how long to wait for room while the peer's receive buffer is full.
    /// - Throws: ``DescriptorPassingError/Code/timedOut`` when the peer's buffer stays full that long,
    ///   ``DescriptorPassingError/Code/cancelled`` when this userfaultfd or the connection is closed.
    public func send(
        over connection: UnixSocketConnection, payload: [UInt8] = [], timeout: Duration = .seconds(5)
    ) throws(DescriptorPassingError) {
        guard lease.acquire() else {
            throw DescriptorPassingError(.cancelled, operation: "sendmsg", detail: "the userfaultfd is closed")
        }
        defer { lease.release() }
        try connection.send(payload, descriptors: [lease.descriptor], timeout: timeout)
    }

    /// Receives one message that must carry exactly one userfaultfd, and adopts it.
    ///
    /// - Parameters:
    ///   - connection: a connected Unix stream socket.
    ///   - enabledFeatures: what the sender enabled in its handshake (it decides how messages are decoded).
    ///   - maximumPayload: the largest payload accepted.
    ///   - timeout: how long to wait for the message.
    /// - Returns: the adopted userfaultfd and the payload that came with it (empty for the single zero byte that
    ///   ``send(over:payload:timeout:)`` sends for an empty payload).
    /// - Throws: ``DescriptorPassingError`` with ``DescriptorPassingError/Code/noDescriptor``,
    ///   ``DescriptorPassingError/Code/tooManyDescriptors(_:)`` (all of them are closed),
    ///   ``DescriptorPassingError/Code/payloadTruncated``, ``DescriptorPassingError/Code/connectionClosed``; or
    ///   ``UserfaultError`` with ``UserfaultError/Code/notUserfaultfd`` when the descriptor is something else (closed too).
    public static func receive(
        from connection: UnixSocketConnection,
        enabledFeatures: UserfaultFeatures = [],
        maximumPayload: Int = 64 * 1024,
        timeout: Duration? = nil
    ) async throws -> (uffd: UserfaultFD, payload: [UInt8]) {
        let message = try await connection.receive(maximumPayload: maximumPayload, timeout: timeout)
        if message.isEndOfStream {
            throw DescriptorPassingError(.connectionClosed, operation: "recvmsg", detail: "the peer closed the connection")
        }
        guard message.descriptors.count == 1, let descriptor = message.descriptors.first else {
            message.closeDescriptors()
            throw DescriptorPassingError(
                message.descriptors.isEmpty ? .noDescriptor : .tooManyDescriptors(message.descriptors.count),
                operation: "recvmsg", detail: "expected one userfaultfd with the \(message.payload.count)-byte payload")
        }
        do {
            let payload = message.payload == [0] ? [] : message.payload
            return (try UserfaultFD(adopting: descriptor, enabledFeatures: enabledFeatures), payload)
        } catch {
            message.closeDescriptors()
            throw error
        }
    }
}
