import { BlocksnapError, toBlocksnapError } from '../errors.js';
import { decodeSingleFrame, DEFAULT_MAX_FRAME_BYTES, encodeFrame } from '../codec.js';
import type { Envelope } from '../messages.js';
import { CloseCode, closeCodeFor, closeReason, disconnected, fitCloseReason, isSendableCloseCode, TransportBase, type Transport } from '../transport.js';

/**
 * Two connected in-process Transport ends for unit tests of the layers above
 * the protocol. Every envelope goes through encodeFrame/decodeSingleFrame, so
 * codec limits and aliasing behave as over a WebSocket; frames and closes
 * travel in order, each one event-loop turn (setImmediate) later, like a
 * socket. A bad frame closes both ends with the codes ws-transport uses.
 */
export interface MemoryTransport extends Transport {
  /** Delivers raw bytes (or a text message) to the peer without encoding: for testing bad input. */
  sendRaw(data: Uint8Array | string): void;
  /** Drops the connection without a close handshake, like a network failure (peer sees E_DISCONNECTED). */
  drop(): void;
}

class MemoryEnd extends TransportBase implements MemoryTransport {
  peer!: MemoryEnd;
  private inFlight = 0;
  private failure: BlocksnapError | undefined;

  constructor(
    readonly remote: string,
    private readonly maxFrameBytes: number,
  ) {
    super();
  }

  get bufferedAmount(): number {
    return this.inFlight;
  }

  send(env: Envelope): Promise<void> {
    if (this.closing) return Promise.reject(disconnected(this.remote));
    let frame: Buffer;
    try {
      frame = encodeFrame(env, this.maxFrameBytes);
    } catch (e) {
      return Promise.reject(toBlocksnapError(e));
    }
    this.inFlight += frame.length;
    return new Promise((resolve) => {
      setImmediate(() => {
        this.inFlight -= frame.length;
        this.peer.received(frame);
        resolve();
      });
    });
  }

  sendRaw(data: Uint8Array | string): void {
    if (this.closing) throw disconnected(this.remote);
    setImmediate(() => this.peer.received(typeof data === 'string' ? data : Buffer.from(data)));
  }

  close(code: number = CloseCode.NORMAL, reason = ''): void {
    if (this.closing) return;
    this.closing = true;
    if (!isSendableCloseCode(code)) code = CloseCode.INTERNAL_ERROR;
    reason = fitCloseReason(reason);
    setImmediate(() => {
      this.peer.peerClosed(code, reason);
      this.finish(this.failure);
    });
  }

  drop(): void {
    if (this.closing) return;
    this.closing = true;
    setImmediate(() => {
      this.peer.peerClosed(1006, 'connection dropped');
      this.finish();
    });
  }

  protected abort(err: BlocksnapError): void {
    this.failure ??= err;
    this.close(CloseCode.INTERNAL_ERROR, closeReason(err));
  }

  private received(data: Buffer | string): void {
    if (this.closing) return;
    if (typeof data === 'string') {
      this.failure = new BlocksnapError('E_FRAME_MALFORMED', `text message from ${this.remote}`);
      this.close(CloseCode.POLICY_VIOLATION, closeReason(this.failure));
      return;
    }
    let env: Envelope;
    try {
      env = decodeSingleFrame(data, this.maxFrameBytes);
    } catch (e) {
      this.failure = toBlocksnapError(e, 'E_FRAME_MALFORMED');
      this.close(closeCodeFor(this.failure), closeReason(this.failure));
      return;
    }
    this.deliver(env);
  }

  private peerClosed(code: number, reason: string): void {
    const byUs = this.closing;
    this.closing = true;
    if (byUs || code === CloseCode.NORMAL) return this.finish(this.failure);
    this.finish(new BlocksnapError('E_DISCONNECTED', `connection closed by ${this.remote}: ${code}${reason ? ` ${reason}` : ''}`));
  }
}

/** `maxFrameBytes`: one limit for both ends, or `[a, b]` to give each end its own. */
export function memoryTransportPair(opts: { maxFrameBytes?: number | [number, number] } = {}): [MemoryTransport, MemoryTransport] {
  const [maxA, maxB] = Array.isArray(opts.maxFrameBytes) ? opts.maxFrameBytes : [opts.maxFrameBytes, opts.maxFrameBytes];
  const a = new MemoryEnd('memory:b', maxA ?? DEFAULT_MAX_FRAME_BYTES);
  const b = new MemoryEnd('memory:a', maxB ?? DEFAULT_MAX_FRAME_BYTES);
  a.peer = b;
  b.peer = a;
  return [a, b];
}
