import { BlocksnapError } from './errors.js';
import type { Envelope } from './messages.js';

/**
 * A message-oriented, ordered, reliable connection carrying Envelopes
 * (DESIGN.md §4). Implementations: ws-transport.ts (agent ↔ appliance) and
 * testing/memory-transport.ts (in-process pair for unit tests). Both encode
 * and decode every envelope through the frame codec.
 *
 * Contract:
 * - `send` encodes the envelope synchronously and resolves once the frame is
 *   handed to the socket (so awaiting each send is natural backpressure; use
 *   `bufferedAmount` for finer flow control). It rejects with
 *   E_FRAME_TOO_LARGE when the envelope exceeds the frame limit (nothing is
 *   sent, the transport stays open) and with E_DISCONNECTED once the
 *   transport is closing or closed, or when the socket fails before the
 *   frame left.
 * - `onMessage` listeners get every received envelope once, in order, in
 *   registration order. Envelopes that arrive before the first listener is
 *   registered are held and delivered (asynchronously) when it is, so a
 *   caller may register after awaiting the connection. After a local
 *   `close()` nothing more is delivered. A listener that throws closes the
 *   transport with E_INTERNAL (close code 1011): a bug must not go unnoticed.
 * - `onClose` listeners are called exactly once, asynchronously, after every
 *   envelope received before the close was delivered. `err` is undefined for
 *   a local `close()` and for a peer's normal close (1000); otherwise a
 *   BlocksnapError: E_FRAME_TOO_LARGE / E_FRAME_MALFORMED when the peer sent
 *   a bad frame (this side then closed with 1009 / 1008), E_DISCONNECTED when
 *   the peer closed abnormally or the connection dropped, E_INTERNAL for a
 *   throwing listener. A listener registered after the close is still called.
 * - `close(code = 1000, reason = '')` is idempotent; sends fail from then on.
 *   A code a WebSocket may not send becomes 1011; the reason is cut to 123 bytes.
 * - `bufferedAmount`: bytes accepted by `send` not yet written to the socket.
 * - `remote`: the peer, for logs ("127.0.0.1:40312").
 * - `authenticated()` (server transports with pre-authentication bounds):
 *   the peer proved who it is; lifts those bounds (DESIGN.md §4.2).
 */
export interface Transport {
  authenticated?(): void;
  send(env: Envelope): Promise<void>;
  onMessage(cb: (env: Envelope) => void): void;
  onClose(cb: (err?: BlocksnapError) => void): void;
  close(code?: number, reason?: string): void;
  readonly bufferedAmount: number;
  readonly remote: string;
}

/** WebSocket close codes the transports use (RFC 6455 §7.4.1). */
export const CloseCode = {
  NORMAL: 1000,
  GOING_AWAY: 1001,
  POLICY_VIOLATION: 1008,
  MESSAGE_TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
} as const;

/** The close code a transport uses when it rejects a frame with `err`. */
export function closeCodeFor(err: BlocksnapError): number {
  return err.code === 'E_FRAME_TOO_LARGE' ? CloseCode.MESSAGE_TOO_BIG : CloseCode.POLICY_VIOLATION;
}

/** `reason` cut to the 123 bytes a WebSocket close frame allows. */
export function fitCloseReason(reason: string): string {
  while (Buffer.byteLength(reason) > 123) reason = reason.slice(0, -1);
  return reason;
}

/** The close reason for a failure: "<code>: <message>", so the peer's log names it. */
export function closeReason(err: BlocksnapError): string {
  return fitCloseReason(`${err.code}: ${err.message}`);
}

/** Codes a WebSocket endpoint may send: 1000–1003, 1007–1014, 3000–4999. */
export function isSendableCloseCode(code: number): boolean {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) || (code >= 3000 && code <= 4999);
}

export function disconnected(remote: string, cause?: unknown): BlocksnapError {
  return new BlocksnapError('E_DISCONNECTED', `transport to ${remote} is closed`, { cause });
}

/**
 * Listener bookkeeping shared by the transports, so both honour the
 * delivery and close rules above identically. Subclasses call `deliver` for
 * each decoded envelope and `finish` once when the connection is gone.
 */
export abstract class TransportBase implements Transport {
  private readonly messageListeners: Array<(env: Envelope) => void> = [];
  private readonly closeListeners: Array<(err?: BlocksnapError) => void> = [];
  private readonly pending: Envelope[] = [];
  private flushScheduled = false;
  private closed: { err?: BlocksnapError } | null = null;
  private closeFired = false;
  /** Set by `close()` or a local failure: sends fail, deliveries stop. */
  protected closing = false;

  abstract readonly remote: string;
  abstract get bufferedAmount(): number;
  abstract send(env: Envelope): Promise<void>;
  abstract close(code?: number, reason?: string): void;
  /** Tears the connection down after a listener threw. */
  protected abstract abort(err: BlocksnapError): void;

  onMessage(cb: (env: Envelope) => void): void {
    this.messageListeners.push(cb);
    if (this.pending.length > 0) this.scheduleFlush();
  }

  onClose(cb: (err?: BlocksnapError) => void): void {
    this.closeListeners.push(cb);
    if (this.closeFired) queueMicrotask(() => cb(this.closed?.err));
  }

  protected deliver(env: Envelope): void {
    if (this.closing) return;
    if (this.messageListeners.length > 0 && this.pending.length === 0 && !this.closed) {
      this.dispatch(env);
    } else {
      this.pending.push(env);
      if (this.messageListeners.length > 0) this.scheduleFlush();
    }
  }

  protected finish(err?: BlocksnapError): void {
    if (this.closed) return;
    this.closed = err ? { err } : {};
    this.scheduleFlush();
  }

  private scheduleFlush(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    queueMicrotask(() => {
      this.flushScheduled = false;
      while (this.pending.length > 0 && this.messageListeners.length > 0 && !this.closing) {
        this.dispatch(this.pending.shift()!);
      }
      if (this.closed && !this.closeFired) {
        this.closeFired = true;
        for (const cb of this.closeListeners.slice()) cb(this.closed.err);
      }
    });
  }

  private dispatch(env: Envelope): void {
    for (const cb of this.messageListeners.slice()) {
      try {
        cb(env);
      } catch (e) {
        this.abort(new BlocksnapError('E_INTERNAL', `onMessage listener threw on ${env.kind}: ${(e as Error)?.message ?? e}`, { cause: e }));
        return;
      }
    }
  }
}
