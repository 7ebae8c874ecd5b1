/**
 * Pure codec of the NBD protocol (the NBD project's doc/proto.md), server side:
 * bytes in, messages out, incremental over any split of the stream. No
 * sockets here (nbd-server.ts is the adapter). Client-side encoders are here
 * too, so tests (and a later client) build streams from the same layouts.
 * All integers are big-endian. Constants: nbd-layout.ts.
 *
 * Handshake (fixed newstyle):
 *   S greeting        0 u64 NBDMAGIC  8 u64 IHAVEOPT  16 u16 handshake flags   (18)
 *   C client flags    0 u32 flags (FIXED_NEWSTYLE, NO_ZEROES)                    (4)
 *   C option          0 u64 IHAVEOPT  8 u32 option  12 u32 length L  16 data[L]
 *       GO / INFO data:  u32 name length N, name[N], u16 count K, K × u16 info type
 *       EXPORT_NAME data: the name (whole data)
 *       LIST_META_CONTEXT / SET_META_CONTEXT data: u32 name length N, name[N],
 *                        u32 query count Q, Q × (u32 length M, query[M])
 *       LIST, ABORT, STRUCTURED_REPLY: no data
 *   S option reply    0 u64 REP_MAGIC 8 u32 option  12 u32 reply type  16 u32 length L  20 data[L]
 *       SERVER data:       u32 name length N, name[N]
 *       INFO EXPORT:       u16 0, u64 size, u16 transmission flags           (12)
 *       INFO BLOCK_SIZE:   u16 3, u32 minimum, u32 preferred, u32 maximum    (14)
 *       META_CONTEXT data: u32 context id, context name (rest of the data)
 *       errors (bit 31):   optional UTF-8 message
 *   S EXPORT_NAME reply 0 u64 size  8 u16 transmission flags  10 124 zero bytes unless NO_ZEROES
 *
 * Transmission:
 *   C request         0 u32 0x25609513  4 u16 flags  6 u16 type  8 u64 cookie
 *                     16 u64 offset  24 u32 length  (28)  then length bytes for WRITE only
 *   S simple reply    0 u32 0x67446698  4 u32 error  8 u64 cookie  (16)  then data (READ only)
 *   S structured chunk 0 u32 0x668e33ef  4 u16 flags (DONE)  6 u16 type  8 u64 cookie
 *                     16 u32 length L  20 payload[L]
 *       OFFSET_DATA:  u64 offset, data
 *       OFFSET_HOLE:  u64 offset, u32 hole length
 *       NONE:         empty (with DONE)
 *       ERROR:        u32 error, u16 message length M, message[M]
 *       BLOCK_STATUS: u32 context id, then per extent: u32 length, u32 status flags
 *
 * The decoder does not know whether the server accepts a GO or EXPORT_NAME,
 * so after emitting one it stops parsing (bytes stay buffered) until the
 * server calls `startTransmission()` (accepted) or `resumeOptions()` (refused).
 * It stops after STARTTLS too: the bytes after it are the TLS handshake; the
 * server upgrades the transport, checks nothing plaintext was left buffered
 * (a client must wait for the reply) and calls `resumeOptions()`.
 * A WRITE's payload length is checked against MAX_PAYLOAD from the 28-byte
 * header alone, before any of the payload is held, at whatever split.
 */
import { BlocksnapError } from '../../proto/errors.js';
import {
  CLIENT_FLAGS_BYTES,
  Cmd,
  EXPORT_NAME_PADDING,
  HandshakeFlag,
  Info,
  MAX_OPTION_DATA,
  MAX_PAYLOAD,
  MAX_STRING,
  NBD_MAGIC,
  NBD_OPT_MAGIC,
  NBD_REP_MAGIC,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  OPTION_HEADER_BYTES,
  OPTION_REPLY_HEADER_BYTES,
  Opt,
  REQUEST_HEADER_BYTES,
  ReplyFlag,
  ReplyType,
  SIMPLE_REPLY_HEADER_BYTES,
  STRUCTURED_REPLY_HEADER_BYTES,
} from './nbd-layout.js';

export interface ExportRequest {
  name: string;
  /** NBD_INFO_* types the client asked for. */
  infos: number[];
}

export interface MetaContextRequest {
  name: string;
  queries: string[];
}

export type NbdClientMessage =
  | { kind: 'clientFlags'; flags: number }
  /**
   * `exportRequest` is set for GO/INFO with well-formed data and for
   * EXPORT_NAME; it is undefined when GO/INFO data is malformed (reply
   * NBD_REP_ERR_INVALID).
   */
  | { kind: 'option'; option: number; data: Buffer; exportRequest?: ExportRequest; metaContextRequest?: MetaContextRequest }
  /** `offset` is exact up to 2^53; anything above is past every real export anyway. */
  | { kind: 'request'; flags: number; type: number; cookie: Buffer; offset: number; length: number; payload?: Buffer };

type Phase = 'clientFlags' | 'options' | 'paused' | 'transmission';

/** Most bytes held while paused (one largest WRITE request). */
export const MAX_PAUSED_BYTES = REQUEST_HEADER_BYTES + MAX_PAYLOAD;

function protocolError(msg: string): BlocksnapError {
  return new BlocksnapError('E_PROTOCOL', `nbd: ${msg}`);
}

/** GO/INFO option data → name and info requests, or undefined when malformed. */
export function parseExportRequest(data: Buffer): ExportRequest | undefined {
  if (data.length < 6) return undefined;
  const n = data.readUInt32BE(0);
  if (n > MAX_STRING || 4 + n + 2 > data.length) return undefined;
  const name = data.toString('utf8', 4, 4 + n);
  const k = data.readUInt16BE(4 + n);
  if (data.length !== 4 + n + 2 + 2 * k) return undefined;
  const infos: number[] = [];
  for (let i = 0; i < k; i++) infos.push(data.readUInt16BE(4 + n + 2 + 2 * i));
  return { name, infos };
}

/** LIST_/SET_META_CONTEXT option data → export name and queries, or undefined when malformed. */
export function parseMetaContextRequest(data: Buffer): MetaContextRequest | undefined {
  if (data.length < 8) return undefined;
  const n = data.readUInt32BE(0);
  if (n > MAX_STRING || 4 + n + 4 > data.length) return undefined;
  const name = data.toString('utf8', 4, 4 + n);
  const q = data.readUInt32BE(4 + n);
  let at = 8 + n;
  const queries: string[] = [];
  for (let i = 0; i < q; i++) {
    if (at + 4 > data.length) return undefined;
    const m = data.readUInt32BE(at);
    if (m > MAX_STRING || at + 4 + m > data.length) return undefined;
    queries.push(data.toString('utf8', at + 4, at + 4 + m));
    at += 4 + m;
  }
  return at === data.length ? { name, queries } : undefined;
}

/** Incremental decoder of what a client sends to the server. */
export class NbdServerDecoder {
  private chunks: Buffer[] = [];
  private held = 0;
  private phase: Phase;

  constructor(opts: { phase?: 'clientFlags' | 'transmission' } = {}) {
    this.phase = opts.phase ?? 'clientFlags';
  }

  /** Bytes received and not yet decoded. */
  get buffered(): number { return this.held; }

  get currentPhase(): Phase { return this.phase; }

  push(bytes: Uint8Array): NbdClientMessage[] {
    if (bytes.length > 0) {
      this.chunks.push(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length));
      this.held += bytes.length;
    }
    // While paused nothing is decoded, so nothing else bounds what is held:
    // a client may pipeline at most one largest request behind its GO.
    if (this.phase === 'paused' && this.held > MAX_PAUSED_BYTES) {
      throw protocolError(`${this.held} bytes sent before the server answered`);
    }
    return this.drain();
  }

  /** The server accepted GO/EXPORT_NAME: what follows are requests. */
  startTransmission(): NbdClientMessage[] {
    if (this.phase !== 'paused') throw protocolError('startTransmission outside a paused negotiation');
    this.phase = 'transmission';
    return this.drain();
  }

  /** The server refused GO: the client may send more options. */
  resumeOptions(): NbdClientMessage[] {
    if (this.phase !== 'paused') throw protocolError('resumeOptions outside a paused negotiation');
    this.phase = 'options';
    return this.drain();
  }

  private drain(): NbdClientMessage[] {
    const out: NbdClientMessage[] = [];
    for (;;) {
      const msg = this.next();
      if (!msg) return out;
      out.push(msg);
    }
  }

  /** Contiguous view of the first n buffered bytes (n ≤ held). */
  private peek(n: number): Buffer {
    if (this.chunks[0]!.length < n) {
      const all = Buffer.concat(this.chunks, this.held);
      this.chunks = [all];
    }
    return this.chunks[0]!.subarray(0, n);
  }

  /** Remove n bytes from the front, returning a copy the caller may keep. */
  private take(n: number): Buffer {
    const b = Buffer.from(this.peek(n));
    const first = this.chunks[0]!;
    if (first.length === n) this.chunks.shift();
    else this.chunks[0] = first.subarray(n);
    this.held -= n;
    return b;
  }

  private next(): NbdClientMessage | undefined {
    switch (this.phase) {
      case 'paused':
        return undefined;
      case 'clientFlags': {
        if (this.held < CLIENT_FLAGS_BYTES) return undefined;
        this.phase = 'options';
        return { kind: 'clientFlags', flags: this.take(CLIENT_FLAGS_BYTES).readUInt32BE(0) };
      }
      case 'options': {
        if (this.held < OPTION_HEADER_BYTES) return undefined;
        const h = this.peek(OPTION_HEADER_BYTES);
        if (h.readBigUInt64BE(0) !== NBD_OPT_MAGIC) throw protocolError('option without IHAVEOPT magic');
        const option = h.readUInt32BE(8);
        const len = h.readUInt32BE(12);
        if (len > MAX_OPTION_DATA) throw protocolError(`option ${option} data of ${len} bytes (max ${MAX_OPTION_DATA})`);
        if (this.held < OPTION_HEADER_BYTES + len) return undefined;
        const data = this.take(OPTION_HEADER_BYTES + len).subarray(OPTION_HEADER_BYTES);
        // GO/EXPORT_NAME: what follows depends on the server's answer.
        // STARTTLS: what follows is TLS, decoded only after the upgrade.
        if (option === Opt.GO || option === Opt.EXPORT_NAME || option === Opt.STARTTLS) this.phase = 'paused';
        if (option === Opt.GO || option === Opt.INFO) {
          return { kind: 'option', option, data, exportRequest: parseExportRequest(data) };
        }
        if (option === Opt.EXPORT_NAME) {
          return { kind: 'option', option, data, exportRequest: { name: data.toString('utf8'), infos: [] } };
        }
        if (option === Opt.LIST_META_CONTEXT || option === Opt.SET_META_CONTEXT) {
          return { kind: 'option', option, data, metaContextRequest: parseMetaContextRequest(data) };
        }
        return { kind: 'option', option, data };
      }
      case 'transmission': {
        if (this.held < REQUEST_HEADER_BYTES) return undefined;
        const h = this.peek(REQUEST_HEADER_BYTES);
        if (h.readUInt32BE(0) !== NBD_REQUEST_MAGIC) throw protocolError('request without its magic');
        const type = h.readUInt16BE(6);
        const length = h.readUInt32BE(24);
        const payloadLen = type === Cmd.WRITE ? length : 0;
        if (payloadLen > MAX_PAYLOAD) throw protocolError(`write payload of ${length} bytes (max ${MAX_PAYLOAD})`);
        if (this.held < REQUEST_HEADER_BYTES + payloadLen) return undefined;
        const all = this.take(REQUEST_HEADER_BYTES + payloadLen);
        const msg: NbdClientMessage = {
          kind: 'request',
          flags: all.readUInt16BE(4),
          type,
          cookie: all.subarray(8, 16),
          offset: Number(all.readBigUInt64BE(16)),
          length,
        };
        if (type === Cmd.WRITE) msg.payload = all.subarray(REQUEST_HEADER_BYTES);
        return msg;
      }
    }
  }
}

// ---- server → client encoders ----

export function encodeGreeting(flags: number = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES): Buffer {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(NBD_MAGIC, 0);
  b.writeBigUInt64BE(NBD_OPT_MAGIC, 8);
  b.writeUInt16BE(flags, 16);
  return b;
}

export function encodeOptionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(OPTION_REPLY_HEADER_BYTES + data.length);
  b.writeBigUInt64BE(NBD_REP_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, OPTION_REPLY_HEADER_BYTES);
  return b;
}

/** NBD_REP_SERVER payload: one export name. */
export function encodeServerEntry(name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.alloc(4 + n.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  return b;
}

/** NBD_REP_INFO payload NBD_INFO_EXPORT. */
export function encodeInfoExport(size: number, transmitFlags: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeUInt16BE(Info.EXPORT, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(transmitFlags, 10);
  return b;
}

/** NBD_REP_INFO payload NBD_INFO_BLOCK_SIZE. */
export function encodeInfoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.alloc(14);
  b.writeUInt16BE(Info.BLOCK_SIZE, 0);
  b.writeUInt32BE(minimum, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(maximum, 10);
  return b;
}

/** NBD_REP_META_CONTEXT payload. */
export function encodeMetaContext(id: number, name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.alloc(4 + n.length);
  b.writeUInt32BE(id, 0);
  n.copy(b, 4);
  return b;
}

/** Reply to NBD_OPT_EXPORT_NAME (ends negotiation; there is no error form). */
export function encodeExportNameReply(size: number, transmitFlags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(10 + (noZeroes ? 0 : EXPORT_NAME_PADDING));
  b.writeBigUInt64BE(BigInt(size), 0);
  b.writeUInt16BE(transmitFlags, 8);
  return b;
}

/** Simple reply header; for a successful READ the data follows it (pass it to have it appended). */
export function encodeSimpleReply(cookie: Buffer, error: number, data?: Buffer): Buffer {
  const b = Buffer.alloc(SIMPLE_REPLY_HEADER_BYTES + (data?.length ?? 0));
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  cookie.copy(b, 8, 0, 8);
  data?.copy(b, SIMPLE_REPLY_HEADER_BYTES);
  return b;
}

function chunkHeader(b: Buffer, cookie: Buffer, type: number, done: boolean, length: number): void {
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(done ? ReplyFlag.DONE : 0, 4);
  b.writeUInt16BE(type, 6);
  cookie.copy(b, 8, 0, 8);
  b.writeUInt32BE(length, 16);
}

/** The 28 bytes before an OFFSET_DATA chunk's data (sent with the data without copying it). */
export function encodeOffsetDataHeader(cookie: Buffer, offset: number, dataLength: number, done: boolean): Buffer {
  const b = Buffer.alloc(STRUCTURED_REPLY_HEADER_BYTES + 8);
  chunkHeader(b, cookie, ReplyType.OFFSET_DATA, done, 8 + dataLength);
  b.writeBigUInt64BE(BigInt(offset), 20);
  return b;
}

export function encodeOffsetData(cookie: Buffer, offset: number, data: Buffer, done: boolean): Buffer {
  const b = Buffer.alloc(STRUCTURED_REPLY_HEADER_BYTES + 8 + data.length);
  chunkHeader(b, cookie, ReplyType.OFFSET_DATA, done, 8 + data.length);
  b.writeBigUInt64BE(BigInt(offset), 20);
  data.copy(b, 28);
  return b;
}

export function encodeOffsetHole(cookie: Buffer, offset: number, length: number, done: boolean): Buffer {
  const b = Buffer.alloc(STRUCTURED_REPLY_HEADER_BYTES + 12);
  chunkHeader(b, cookie, ReplyType.OFFSET_HOLE, done, 12);
  b.writeBigUInt64BE(BigInt(offset), 20);
  b.writeUInt32BE(length, 28);
  return b;
}

export function encodeNoneDone(cookie: Buffer): Buffer {
  const b = Buffer.alloc(STRUCTURED_REPLY_HEADER_BYTES);
  chunkHeader(b, cookie, ReplyType.NONE, true, 0);
  return b;
}

export function encodeErrorChunk(cookie: Buffer, error: number, message: string, done = true): Buffer {
  const m = Buffer.from(message, 'utf8').subarray(0, MAX_STRING);
  const b = Buffer.alloc(STRUCTURED_REPLY_HEADER_BYTES + 6 + m.length);
  chunkHeader(b, cookie, ReplyType.ERROR, done, 6 + m.length);
  b.writeUInt32BE(error, 20);
  b.writeUInt16BE(m.length, 24);
  m.copy(b, 26);
  return b;
}

export interface Extent {
  length: number;
  flags: number;
}

export function encodeBlockStatus(cookie: Buffer, contextId: number, extents: Extent[], done: boolean): Buffer {
  const len = 4 + 8 * extents.length;
  const b = Buffer.alloc(STRUCTURED_REPLY_HEADER_BYTES + len);
  chunkHeader(b, cookie, ReplyType.BLOCK_STATUS, done, len);
  b.writeUInt32BE(contextId, 20);
  extents.forEach((e, i) => {
    b.writeUInt32BE(e.length, 24 + 8 * i);
    b.writeUInt32BE(e.flags, 28 + 8 * i);
  });
  return b;
}

// ---- client → server encoders (tests, and a later client) ----

export function encodeClientFlags(flags: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}

export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(OPTION_HEADER_BYTES + data.length);
  b.writeBigUInt64BE(NBD_OPT_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, OPTION_HEADER_BYTES);
  return b;
}

/** GO/INFO option data. */
export function encodeExportRequest(name: string, infos: number[] = []): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((t, i) => b.writeUInt16BE(t, 4 + n.length + 2 + 2 * i));
  return b;
}

/** LIST_/SET_META_CONTEXT option data. */
export function encodeMetaContextRequest(name: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const u32 = (v: number): Buffer => {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(v, 0);
    return b;
  };
  const n = Buffer.from(name, 'utf8');
  parts.push(u32(n.length), n, u32(queries.length));
  for (const q of queries) {
    const qb = Buffer.from(q, 'utf8');
    parts.push(u32(qb.length), qb);
  }
  return Buffer.concat(parts);
}

export function encodeRequest(r: {
  flags?: number;
  type: number;
  cookie: Buffer;
  offset: number;
  length: number;
  payload?: Buffer;
}): Buffer {
  const payload = r.type === Cmd.WRITE ? (r.payload ?? Buffer.alloc(r.length)) : Buffer.alloc(0);
  const b = Buffer.alloc(REQUEST_HEADER_BYTES + payload.length);
  b.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  b.writeUInt16BE(r.flags ?? 0, 4);
  b.writeUInt16BE(r.type, 6);
  r.cookie.copy(b, 8, 0, 8);
  b.writeBigUInt64BE(BigInt(r.offset), 16);
  b.writeUInt32BE(r.length, 24);
  payload.copy(b, REQUEST_HEADER_BYTES);
  return b;
}
