/**
 * One NBD client's conversation with the server, over an abstract byte pipe
 * (nbd-server.ts gives it a TCP socket, later a TLS socket). The codec
 * parses; this decides: which options are answered how, and what each
 * request does to the export the resolver named.
 *
 * Policy:
 * - The export comes from the injected resolver (nbd-export.ts), asked with
 *   the name and the peer's address at GO / INFO / EXPORT_NAME (and at
 *   LIST_/SET_META_CONTEXT, which name an export too). Unknown → ERR_UNKNOWN;
 *   EXPORT_NAME for an unknown name closes (the protocol has no error reply).
 *   Every export the resolver returned is released once: right after the
 *   option for INFO / meta contexts, when the connection ends for GO.
 * - LIST answers an empty list: export names are secrets (issue 9: ≥ 128
 *   random bits handed to one client), so they are never enumerated.
 * - Meta contexts: only "base:allocation" (holes = zero chunks of the image
 *   or zeroed chunks of the overlay), so `nbdinfo --map` and `nbdcopy` skip
 *   them. A context set for one name does not carry over to a GO for another.
 * - TLS (when the server has a certificate): STARTTLS upgrades the transport;
 *   before it every option but STARTTLS and ABORT gets ERR_TLS_REQD
 *   (EXPORT_NAME closes). Without a certificate STARTTLS → ERR_UNSUP.
 * - Flags per export: READ_ONLY only when read-only, else SEND_TRIM,
 *   SEND_WRITE_ZEROES, SEND_FUA; CAN_MULTI_CONN when the export says so.
 *   Read-only: WRITE, TRIM, WRITE_ZEROES → EPERM. Writes past the end →
 *   ENOSPC; reads past the end, over-size requests, unknown commands → EINVAL.
 *   FUA = the operation, then the export's flush, before the reply.
 * - Up to MAX_INFLIGHT requests of a connection are served at once; replies
 *   may come out of order (the protocol allows it); DISC waits for the rest.
 *   Reading from the client pauses while more than MAX_QUEUED decoded
 *   requests, or more than MAX_QUEUED_BYTES of WRITE payload, wait.
 */
import type { Logger } from 'pino';
import { isBlocksnapError } from '../../proto/errors.js';
import {
  NbdServerDecoder,
  encodeErrorChunk,
  encodeBlockStatus,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeMetaContext,
  encodeNoneDone,
  encodeOffsetDataHeader,
  encodeOffsetHole,
  encodeOptionReply,
  encodeSimpleReply,
  type NbdClientMessage,
} from './nbd-codec.js';
import {
  BASE_ALLOCATION,
  ClientFlag,
  CmdFlag,
  Cmd,
  HandshakeFlag,
  KNOWN_CLIENT_FLAGS,
  MAX_PAYLOAD,
  NbdErrno,
  Opt,
  Rep,
  State,
  TransmitFlag,
} from './nbd-layout.js';
import type { NbdExport, NbdExportResolver, NbdPeer } from './nbd-export.js';

/** Context id of base:allocation (any fixed number will do; 0 is avoided). */
const BASE_ALLOCATION_ID = 1;
/** Extents per BLOCK_STATUS reply; a client asks again for the rest. */
const MAX_EXTENTS = 1024;
/** Requests of one connection served at the same time. */
const MAX_INFLIGHT = 16;

export const READ_ONLY_FLAGS =
  TransmitFlag.HAS_FLAGS | TransmitFlag.READ_ONLY | TransmitFlag.SEND_FLUSH | TransmitFlag.CAN_MULTI_CONN;

/** Transmission flags advertised for an export. */
export function transmitFlagsOf(exp: Pick<NbdExport, 'readOnly' | 'canMultiConn'>): number {
  let f = TransmitFlag.HAS_FLAGS | TransmitFlag.SEND_FLUSH;
  if (exp.readOnly) f |= TransmitFlag.READ_ONLY;
  else f |= TransmitFlag.SEND_TRIM | TransmitFlag.SEND_WRITE_ZEROES | TransmitFlag.SEND_FUA;
  if (exp.canMultiConn) f |= TransmitFlag.CAN_MULTI_CONN;
  return f;
}

export interface NbdPipe {
  /**
   * Resolves when the bytes are handed to the transport (backpressure). An
   * array is written as one piece (nothing of another reply in between):
   * a chunk's header and its data, without copying the data.
   */
  write(bytes: Buffer | Buffer[]): Promise<void>;
  /** Close the connection (after what was written). */
  end(): void;
  /** Close the connection now, unsent replies dropped (the export was revoked). Absent: end(). */
  destroy?(): void;
  /** Stop / restart reading from the client while too many requests wait. */
  pause?(): void;
  resume?(): void;
  /**
   * Send `reply` (STARTTLS's ACK) in plaintext, then switch the transport to
   * TLS as the server side; resolves once the TLS handshake is done. Absent:
   * the server has no certificate.
   */
  startTls?(reply: Buffer): Promise<void>;
}

export interface NbdSessionOptions {
  log?: Logger;
  /** The server has a certificate: STARTTLS is offered and required. */
  tls?: boolean;
}

/** Decoded requests waiting beyond the in-flight ones before reading pauses. */
export const MAX_QUEUED = 64;
/** WRITE payload bytes waiting before reading pauses (one largest write always fits). */
export const MAX_QUEUED_BYTES = 2 * MAX_PAYLOAD;

type Request = Extract<NbdClientMessage, { kind: 'request' }>;

/** Zeros written for WRITE_ZEROES + NO_HOLE, in bounded pieces (its length may be 4 GiB). */
const ZERO_PIECE = Buffer.alloc(4 * 1024 * 1024);
async function writeZeros(exp: NbdExport, offset: number, length: number): Promise<void> {
  for (let done = 0; done < length; done += ZERO_PIECE.length) {
    await exp.write!(offset + done, ZERO_PIECE.subarray(0, Math.min(ZERO_PIECE.length, length - done)));
  }
}

export class NbdSession {
  private readonly decoder = new NbdServerDecoder();
  private queue: NbdClientMessage[] = [];
  private queuedBytes = 0;
  private running = false;
  private closed = false;
  private noZeroes = false;
  private structured = false;
  private baseAllocation = false;
  /** Export name SET_META_CONTEXT was for. */
  private metaName: string | undefined;
  private tlsActive = false;
  private readonly inflight = new Set<Promise<void>>();
  private paused = false;
  /** The export being served once GO / EXPORT_NAME succeeded. */
  private exp: NbdExport | undefined;
  private readonly log: Logger | undefined;
  private readonly tls: boolean;

  constructor(
    private readonly resolve: NbdExportResolver,
    private readonly peer: NbdPeer,
    private readonly pipe: NbdPipe,
    opts: NbdSessionOptions = {},
  ) {
    this.log = opts.log;
    this.tls = opts.tls === true && pipe.startTls !== undefined;
  }

  start(): Promise<void> {
    return this.pipe.write(encodeGreeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES));
  }

  /** Bytes from the client. Protocol violations close the connection. */
  receive(bytes: Buffer): void {
    if (this.closed) return;
    try {
      this.enqueue(this.decoder.push(bytes));
    } catch (e) {
      this.fail(e);
      return;
    }
    void this.run();
  }

  private enqueue(msgs: NbdClientMessage[]): void {
    for (const m of msgs) {
      this.queue.push(m);
      if (m.kind === 'request' && m.payload) this.queuedBytes += m.payload.length;
    }
    if (!this.paused && (this.queue.length > MAX_QUEUED || this.queuedBytes > MAX_QUEUED_BYTES) && this.pipe.pause) {
      this.paused = true;
      this.pipe.pause();
    }
  }

  /** The transport closed: stop answering, release the export once every running request is done. */
  dispose(): void {
    this.closed = true;
    this.queue = [];
    this.queuedBytes = 0;
    const exp = this.exp;
    this.exp = undefined;
    exp?.revoked?.removeEventListener('abort', this.onRevoked);
    if (exp?.release) {
      void Promise.allSettled([...this.inflight]).then(() => exp.release!());
    }
  }

  /** The export was withdrawn: this connection ends now (nbd-export.ts `revoked`). */
  private readonly onRevoked = (): void => {
    this.log?.info('nbd: export revoked, closing the connection');
    this.close();
    this.pipe.destroy?.();
  };

  /** From GO / EXPORT_NAME on, this connection serves `exp` until it ends or the export is revoked. */
  private serve(exp: NbdExport): void {
    this.exp = exp;
    exp.revoked?.addEventListener('abort', this.onRevoked, { once: true });
  }

  private fail(e: unknown): void {
    this.log?.warn({ err: e }, 'nbd: closing connection');
    this.close();
  }

  private close(): void {
    if (this.closed) return;
    this.closed = true;
    this.queue = [];
    this.queuedBytes = 0;
    this.pipe.end();
  }

  private async run(): Promise<void> {
    if (this.running) return;
    this.running = true;
    try {
      while (!this.closed && this.queue.length > 0) {
        const msg = this.queue.shift()!;
        if (msg.kind === 'request' && msg.type !== Cmd.DISC) {
          // Requests are independent (replies carry the cookie, may come in any
          // order, each written as whole buffers): overlap store reads, bounded.
          while (this.inflight.size >= MAX_INFLIGHT) await Promise.race(this.inflight);
          if (this.closed) break;
          // A payload counts as queued until its request starts.
          if (msg.payload) this.queuedBytes -= msg.payload.length;
          this.maybeResume();
          const p: Promise<void> = this.request(msg)
            .catch((e: unknown) => this.fail(e))
            .finally(() => this.inflight.delete(p));
          this.inflight.add(p);
          continue;
        }
        this.maybeResume();
        // DISC is answered after every earlier request (proto.md).
        if (msg.kind === 'request') await Promise.all(this.inflight);
        this.enqueue(await this.handle(msg));
      }
    } catch (e) {
      this.fail(e);
    } finally {
      this.running = false;
    }
  }

  private maybeResume(): void {
    if (this.paused && this.queue.length <= MAX_QUEUED / 4 && this.queuedBytes <= MAX_QUEUED_BYTES / 2) {
      this.paused = false;
      this.pipe.resume?.();
    }
  }

  /** Returns messages the decoder released (after a GO was decided). */
  private async handle(msg: NbdClientMessage): Promise<NbdClientMessage[]> {
    switch (msg.kind) {
      case 'clientFlags':
        if ((msg.flags & ~KNOWN_CLIENT_FLAGS) !== 0) {
          this.close();
          return [];
        }
        this.noZeroes = (msg.flags & ClientFlag.NO_ZEROES) !== 0;
        return [];
      case 'option':
        return this.option(msg);
      case 'request':
        await this.request(msg);
        return [];
    }
  }

  private reply(option: number, type: number, data?: Buffer): Promise<void> {
    return this.pipe.write(encodeOptionReply(option, type, data));
  }

  /** The resolver's answer; a resolver that throws serves nothing (logged). */
  private async lookup(name: string): Promise<NbdExport | undefined> {
    try {
      const exp = await this.resolve(name, this.peer);
      if (exp?.revoked?.aborted) {
        exp.release?.();
        return undefined;
      }
      return exp;
    } catch (e) {
      this.log?.error({ err: e }, 'nbd: export resolver failed');
      return undefined;
    }
  }

  private async option(msg: Extract<NbdClientMessage, { kind: 'option' }>): Promise<NbdClientMessage[]> {
    const { option, data } = msg;
    if (this.tls && !this.tlsActive && option !== Opt.STARTTLS && option !== Opt.ABORT) {
      if (option === Opt.EXPORT_NAME) {
        this.close();
        return [];
      }
      await this.reply(option, Rep.ERR_TLS_REQD, Buffer.from('TLS required: send NBD_OPT_STARTTLS first'));
      return option === Opt.GO ? this.decoder.resumeOptions() : [];
    }
    switch (option) {
      case Opt.STARTTLS:
        return this.startTls(data);
      case Opt.EXPORT_NAME: {
        const exp = msg.exportRequest ? await this.lookup(msg.exportRequest.name) : undefined;
        if (!exp || this.closed) {
          exp?.release?.();
          this.close();
          return [];
        }
        this.serve(exp);
        this.baseAllocation = false; // EXPORT_NAME clients never negotiated structured replies' contexts
        await this.pipe.write(encodeExportNameReply(exp.size, transmitFlagsOf(exp), this.noZeroes));
        return this.decoder.startTransmission();
      }
      case Opt.GO:
      case Opt.INFO: {
        const req = msg.exportRequest;
        const exp = req ? await this.lookup(req.name) : undefined;
        if (!exp) {
          const refused = req ? Rep.ERR_UNKNOWN : Rep.ERR_INVALID;
          await this.reply(option, refused, Buffer.from(req ? 'no such export' : 'malformed request'));
          return option === Opt.GO ? this.decoder.resumeOptions() : [];
        }
        const keep = option === Opt.GO && !this.closed;
        if (keep) this.serve(exp);
        try {
          await this.reply(option, Rep.INFO, encodeInfoExport(exp.size, transmitFlagsOf(exp)));
          // Any alignment is served; a chunk is the efficient unit.
          await this.reply(option, Rep.INFO, encodeInfoBlockSize(1, Math.min(exp.chunkSize, MAX_PAYLOAD), MAX_PAYLOAD));
          await this.reply(option, Rep.ACK);
        } finally {
          if (!keep) exp.release?.();
        }
        if (option !== Opt.GO) return [];
        if (this.metaName !== req!.name) this.baseAllocation = false;
        return this.decoder.startTransmission();
      }
      case Opt.LIST:
        await this.reply(option, data.length === 0 ? Rep.ACK : Rep.ERR_INVALID);
        return [];
      case Opt.ABORT:
        await this.reply(option, Rep.ACK);
        this.close();
        return [];
      case Opt.LIST_META_CONTEXT:
      case Opt.SET_META_CONTEXT: {
        const req = msg.metaContextRequest;
        const set = option === Opt.SET_META_CONTEXT;
        if (!req || (set && !this.structured)) {
          await this.reply(option, Rep.ERR_INVALID);
          return [];
        }
        const exp = await this.lookup(req.name);
        if (!exp) {
          await this.reply(option, Rep.ERR_UNKNOWN);
          return [];
        }
        exp.release?.();
        const wanted = set
          ? req.queries.includes(BASE_ALLOCATION)
          : req.queries.length === 0 || req.queries.some((q) => q === BASE_ALLOCATION || q === 'base:');
        if (set) {
          this.baseAllocation = wanted;
          this.metaName = req.name;
        }
        if (wanted) await this.reply(option, Rep.META_CONTEXT, encodeMetaContext(set ? BASE_ALLOCATION_ID : 0, BASE_ALLOCATION));
        await this.reply(option, Rep.ACK);
        return [];
      }
      case Opt.STRUCTURED_REPLY:
        if (data.length !== 0) {
          await this.reply(option, Rep.ERR_INVALID);
          return [];
        }
        this.structured = true;
        await this.reply(option, Rep.ACK);
        return [];
      default:
        await this.reply(option, Rep.ERR_UNSUP);
        return [];
    }
  }

  /** STARTTLS: the decoder paused after it; bytes already buffered would be plaintext smuggled past TLS. */
  private async startTls(data: Buffer): Promise<NbdClientMessage[]> {
    if (!this.tls || this.tlsActive || data.length !== 0) {
      await this.reply(Opt.STARTTLS, this.tls ? Rep.ERR_INVALID : Rep.ERR_UNSUP);
      return this.decoder.resumeOptions();
    }
    if (this.decoder.buffered !== 0) {
      this.fail(new Error('nbd: data sent after STARTTLS before its reply'));
      return [];
    }
    await this.pipe.startTls!(encodeOptionReply(Opt.STARTTLS, Rep.ACK));
    this.tlsActive = true;
    return this.decoder.resumeOptions();
  }

  private async request(r: Request): Promise<void> {
    const exp = this.exp!;
    const simple = (error: number): Promise<void> => this.pipe.write(encodeSimpleReply(r.cookie, error));
    switch (r.type) {
      case Cmd.READ:
        return this.read(exp, r.cookie, r.offset, r.length);
      case Cmd.BLOCK_STATUS:
        return this.blockStatus(exp, r.cookie, r.flags, r.offset, r.length);
      case Cmd.DISC:
        this.close();
        return;
      case Cmd.FLUSH:
        return simple(await this.attempt(r, () => exp.flush?.()));
      case Cmd.WRITE:
      case Cmd.TRIM:
      case Cmd.WRITE_ZEROES:
        return simple(await this.modify(exp, r));
      default:
        return simple(NbdErrno.EINVAL);
    }
  }

  /** WRITE / TRIM / WRITE_ZEROES → the errno of the reply. */
  private async modify(exp: NbdExport, r: Request): Promise<number> {
    if (exp.readOnly || !exp.write || !exp.zero) return NbdErrno.EPERM;
    if (r.length > MAX_PAYLOAD && r.type === Cmd.WRITE) return NbdErrno.EINVAL;
    if (r.offset + r.length > exp.size) return NbdErrno.ENOSPC;
    if (r.length === 0) return 0;
    const fua = (r.flags & CmdFlag.FUA) !== 0;
    return this.attempt(r, async () => {
      if (r.type === Cmd.WRITE) await exp.write!(r.offset, r.payload!);
      // NO_HOLE: the range must read as zeros *and* stay allocated (data, not a hole).
      else if (r.type === Cmd.WRITE_ZEROES && (r.flags & CmdFlag.NO_HOLE) !== 0) await writeZeros(exp, r.offset, r.length);
      else await exp.zero!(r.offset, r.length, { trim: r.type === Cmd.TRIM });
      if (fua) await exp.flush?.();
    });
  }

  private async attempt(r: Request, op: () => Promise<void> | void): Promise<number> {
    try {
      await op();
      return 0;
    } catch (e) {
      this.log?.error({ err: e, type: r.type, offset: r.offset, length: r.length }, 'nbd: request failed');
      return (e as NodeJS.ErrnoException)?.code === 'ENOSPC' ? NbdErrno.ENOSPC : NbdErrno.EIO;
    }
  }

  private async blockStatus(exp: NbdExport, cookie: Buffer, flags: number, offset: number, length: number): Promise<void> {
    const size = exp.size;
    if (!this.baseAllocation || length === 0 || offset + length > size) {
      await this.pipe.write(
        this.structured ? encodeErrorChunk(cookie, NbdErrno.EINVAL, 'block status not negotiated or out of range') : encodeSimpleReply(cookie, NbdErrno.EINVAL),
      );
      return;
    }
    let runs;
    try {
      runs = await exp.runs(offset, length, (flags & CmdFlag.REQ_ONE) !== 0 ? 1 : MAX_EXTENTS);
    } catch (e) {
      this.log?.error({ err: e, offset, length }, 'nbd: block status failed');
      await this.pipe.write(encodeErrorChunk(cookie, NbdErrno.EIO, isBlocksnapError(e) ? e.code : 'block status failed'));
      return;
    }
    const extents = runs.map((r) => ({ length: r.length, flags: r.zero ? State.HOLE | State.ZERO : 0 }));
    await this.pipe.write(encodeBlockStatus(cookie, BASE_ALLOCATION_ID, extents, true));
  }

  private async read(exp: NbdExport, cookie: Buffer, offset: number, length: number): Promise<void> {
    const error = async (errno: number, message: string): Promise<void> => {
      await this.pipe.write(this.structured ? encodeErrorChunk(cookie, errno, message) : encodeSimpleReply(cookie, errno));
    };
    if (length > MAX_PAYLOAD || offset + length > exp.size) {
      return error(NbdErrno.EINVAL, `read of ${length} at ${offset} outside the ${exp.size}-byte export`);
    }
    let segments;
    try {
      segments = await exp.read(offset, length);
    } catch (e) {
      this.log?.error({ err: e, offset, length }, 'nbd: read failed');
      return error(NbdErrno.EIO, isBlocksnapError(e) ? e.code : 'read failed');
    }
    if (!this.structured) {
      const buf = Buffer.alloc(length);
      for (const s of segments) if ('data' in s) s.data.copy(buf, s.offset - offset);
      return this.pipe.write(encodeSimpleReply(cookie, 0, buf));
    }
    if (segments.length === 0) return this.pipe.write(encodeNoneDone(cookie));
    // The whole reply in one write (one writev): back-to-back data segments
    // become one OFFSET_DATA chunk whose header precedes their buffers, uncopied.
    const parts: Buffer[] = [];
    for (let i = 0; i < segments.length;) {
      const s = segments[i]!;
      if (!('data' in s)) {
        parts.push(encodeOffsetHole(cookie, s.offset, s.hole, ++i === segments.length));
        continue;
      }
      let j = i + 1;
      let len = s.data.length;
      for (let t; j < segments.length && 'data' in (t = segments[j]!); j++) len += t.data.length;
      parts.push(encodeOffsetDataHeader(cookie, s.offset, len, j === segments.length));
      for (; i < j; i++) parts.push((segments[i] as { data: Buffer }).data);
    }
    return this.pipe.write(parts);
  }
}
