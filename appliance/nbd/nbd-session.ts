/**
 * One NBD client's conversation with a read-only export, over an abstract
 * byte pipe (nbd-server.ts gives it a TCP socket). The codec parses; this
 * decides: which options are answered how, and what each request returns.
 *
 * Policy:
 * - Only `exportName` is served; GO/INFO for any other name → ERR_UNKNOWN,
 *   EXPORT_NAME for another name closes (the protocol has no error reply).
 * - LIST answers an empty list: export names are secrets (issue 9: ≥ 128
 *   random bits handed to one client), so they are never enumerated.
 * - Meta contexts: only "base:allocation" (ZERO chunks are HOLE|ZERO), so
 *   `nbdinfo --map` and `nbdcopy` skip them. STARTTLS and anything unknown
 *   → ERR_UNSUP.
 * - The export is read-only (READ_ONLY, CAN_MULTI_CONN since nothing ever
 *   changes it): WRITE, TRIM, WRITE_ZEROES → EPERM; FLUSH → success;
 *   out-of-range or over-size READ → EINVAL; unknown commands → EINVAL.
 * - Up to MAX_INFLIGHT requests of a connection are served at once; replies
 *   may come out of order (the protocol allows it); DISC waits for the rest.
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
  encodeOffsetData,
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

/** Context id of base:allocation (any fixed number will do; 0 is avoided). */
const BASE_ALLOCATION_ID = 1;
/** Extents per BLOCK_STATUS reply; a client asks again for the rest. */
const MAX_EXTENTS = 1024;
/** Requests of one connection served at the same time. */
const MAX_INFLIGHT = 16;
import type { ImageSource } from './image-source.js';

export const READ_ONLY_FLAGS =
  TransmitFlag.HAS_FLAGS | TransmitFlag.READ_ONLY | TransmitFlag.SEND_FLUSH | TransmitFlag.CAN_MULTI_CONN;

export interface NbdPipe {
  /** Resolves when the bytes are handed to the transport (backpressure). */
  write(bytes: Buffer): Promise<void>;
  /** Close the connection (after what was written). */
  end(): void;
  /** Stop / restart reading from the client while too many requests wait. */
  pause?(): void;
  resume?(): void;
}

/** Decoded requests waiting beyond the in-flight ones before reading pauses. */
export const MAX_QUEUED = 64;

export class NbdSession {
  private readonly decoder = new NbdServerDecoder();
  private queue: NbdClientMessage[] = [];
  private running = false;
  private closed = false;
  private noZeroes = false;
  private structured = false;
  private baseAllocation = false;
  private readonly inflight = new Set<Promise<void>>();
  private paused = false;

  constructor(
    private readonly source: ImageSource,
    private readonly exportName: string,
    private readonly pipe: NbdPipe,
    private readonly log?: Logger,
  ) {}

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
    this.queue.push(...msgs);
    if (!this.paused && this.queue.length > MAX_QUEUED && this.pipe.pause) {
      this.paused = true;
      this.pipe.pause();
    }
  }

  /** The transport closed: stop answering. */
  dispose(): void {
    this.closed = true;
    this.queue = [];
  }

  private fail(e: unknown): void {
    this.log?.warn({ err: e }, 'nbd: closing connection');
    this.close();
  }

  private close(): void {
    if (this.closed) return;
    this.closed = true;
    this.queue = [];
    this.pipe.end();
  }

  private async run(): Promise<void> {
    if (this.running) return;
    this.running = true;
    try {
      while (!this.closed && this.queue.length > 0) {
        const msg = this.queue.shift()!;
        if (this.paused && this.queue.length <= MAX_QUEUED / 4) {
          this.paused = false;
          this.pipe.resume?.();
        }
        if (msg.kind === 'request' && msg.type !== Cmd.DISC) {
          // Requests are independent (replies carry the cookie, may come in any
          // order, each written as whole buffers): overlap store reads, bounded.
          while (this.inflight.size >= MAX_INFLIGHT) await Promise.race(this.inflight);
          if (this.closed) break;
          const p: Promise<void> = this.request(msg)
            .catch((e: unknown) => this.fail(e))
            .finally(() => this.inflight.delete(p));
          this.inflight.add(p);
          continue;
        }
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

  private async option(msg: Extract<NbdClientMessage, { kind: 'option' }>): Promise<NbdClientMessage[]> {
    const { option, data } = msg;
    switch (option) {
      case Opt.EXPORT_NAME:
        if (msg.exportRequest?.name !== this.exportName) {
          this.close();
          return [];
        }
        await this.pipe.write(encodeExportNameReply(this.source.size, READ_ONLY_FLAGS, this.noZeroes));
        return this.decoder.startTransmission();
      case Opt.GO:
      case Opt.INFO: {
        const req = msg.exportRequest;
        let refused: number | undefined;
        if (!req) refused = Rep.ERR_INVALID;
        else if (req.name !== this.exportName) refused = Rep.ERR_UNKNOWN;
        if (refused !== undefined) {
          await this.reply(option, refused, Buffer.from(refused === Rep.ERR_UNKNOWN ? 'no such export' : 'malformed request'));
          return option === Opt.GO ? this.decoder.resumeOptions() : [];
        }
        await this.reply(option, Rep.INFO, encodeInfoExport(this.source.size, READ_ONLY_FLAGS));
        // Any alignment is served; a chunk is the efficient unit.
        await this.reply(option, Rep.INFO, encodeInfoBlockSize(1, Math.min(this.source.chunkSize, MAX_PAYLOAD), MAX_PAYLOAD));
        await this.reply(option, Rep.ACK);
        return option === Opt.GO ? this.decoder.startTransmission() : [];
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
        if (req.name !== this.exportName) {
          await this.reply(option, Rep.ERR_UNKNOWN);
          return [];
        }
        const wanted = set
          ? req.queries.includes(BASE_ALLOCATION)
          : req.queries.length === 0 || req.queries.some((q) => q === BASE_ALLOCATION || q === 'base:');
        if (set) this.baseAllocation = wanted;
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

  private async request(r: Extract<NbdClientMessage, { kind: 'request' }>): Promise<void> {
    const simple = (error: number): Promise<void> => this.pipe.write(encodeSimpleReply(r.cookie, error));
    switch (r.type) {
      case Cmd.READ:
        return this.read(r.cookie, r.offset, r.length);
      case Cmd.BLOCK_STATUS:
        return this.blockStatus(r.cookie, r.flags, r.offset, r.length);
      case Cmd.DISC:
        this.close();
        return;
      case Cmd.FLUSH:
        return simple(0);
      case Cmd.WRITE:
      case Cmd.TRIM:
      case Cmd.WRITE_ZEROES:
        return simple(NbdErrno.EPERM);
      default:
        return simple(NbdErrno.EINVAL);
    }
  }

  private async blockStatus(cookie: Buffer, flags: number, offset: number, length: number): Promise<void> {
    const size = this.source.size;
    if (!this.baseAllocation || length === 0 || offset + length > size) {
      await this.pipe.write(
        this.structured ? encodeErrorChunk(cookie, NbdErrno.EINVAL, 'block status not negotiated or out of range') : encodeSimpleReply(cookie, NbdErrno.EINVAL),
      );
      return;
    }
    let runs;
    try {
      runs = await this.source.runs(offset, length, (flags & CmdFlag.REQ_ONE) !== 0 ? 1 : MAX_EXTENTS);
    } catch (e) {
      this.log?.error({ err: e, offset, length }, 'nbd: block status failed');
      await this.pipe.write(encodeErrorChunk(cookie, NbdErrno.EIO, isBlocksnapError(e) ? e.code : 'block status failed'));
      return;
    }
    const extents = runs.map((r) => ({ length: r.length, flags: r.zero ? State.HOLE | State.ZERO : 0 }));
    await this.pipe.write(encodeBlockStatus(cookie, BASE_ALLOCATION_ID, extents, true));
  }

  private async read(cookie: Buffer, offset: number, length: number): Promise<void> {
    const error = async (errno: number, message: string): Promise<void> => {
      await this.pipe.write(this.structured ? encodeErrorChunk(cookie, errno, message) : encodeSimpleReply(cookie, errno));
    };
    if (length > MAX_PAYLOAD || offset + length > this.source.size) {
      return error(NbdErrno.EINVAL, `read of ${length} at ${offset} outside the ${this.source.size}-byte export`);
    }
    let segments;
    try {
      segments = await this.source.read(offset, length);
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
    for (let i = 0; i < segments.length; i++) {
      const s = segments[i]!;
      const done = i === segments.length - 1;
      await this.pipe.write('data' in s ? encodeOffsetData(cookie, s.offset, s.data, done) : encodeOffsetHole(cookie, s.offset, s.hole, done));
    }
  }
}
