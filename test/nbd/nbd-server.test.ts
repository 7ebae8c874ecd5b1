/**
 * The NBD server against the real libnbd clients (nbdinfo, nbdcopy from
 * Debian's libnbd-bin; scripts/ensure-deps.sh installs it) and a raw socket
 * speaking the codec, over an image built in a real FsChunkStore.
 */
import { execFile } from 'node:child_process';
import { connect, type Socket } from 'node:net';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { BLOB_CHUNK, ZERO_DIGEST } from '../../appliance/store/chunk-store.js';
import { FsChunkStore } from '../../appliance/store/fs-chunk-store.js';
import { ImageIndexBuilder } from '../../appliance/store/image-index.js';
import { NbdServer, fixedExport } from '../../appliance/nbd/nbd-server.js';
import { ImageSource } from '../../appliance/nbd/image-source.js';
import { readOnlyExport } from '../../appliance/nbd/read-only-export.js';
import {
  encodeClientFlags,
  encodeExportRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
} from '../../appliance/nbd/nbd-codec.js';
import { BASE_ALLOCATION, Cmd, CmdFlag, Info, NbdErrno, Opt, Rep, ReplyFlag, ReplyType, TransmitFlag } from '../../appliance/nbd/nbd-layout.js';
import { TempDirs, compressibleChunk, randomChunk, sha256 } from '../../appliance/testing/store-fixtures.js';

const run = promisify(execFile);
const CS = 4096;
/** Page 0 mixed, page 1 (chunks 1024..2047) all ZERO, then mixed up to a 1000-byte tail. */
const CHUNKS = 3000;
const SIZE = CHUNKS * CS + 1000;
const NAME = 'a3f9c2e1d4b5a6978877665544332211';

const dirs = new TempDirs();
const cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => undefined);
  await dirs.cleanup();
});

function makeVolume(): Buffer {
  const vol = Buffer.alloc(SIZE);
  const repeated = randomChunk(CS);
  for (let i = 0; i < CHUNKS + 1; i++) {
    if (i >= 1024 && i < 2048) continue;
    const at = i * CS;
    const len = Math.min(CS, SIZE - at);
    if (i % 7 === 3) continue; // zero chunk inside a stored page
    const data = i % 5 === 0 ? repeated : i % 2 ? compressibleChunk(CS) : randomChunk(CS);
    data.copy(vol, at, 0, len);
  }
  return vol;
}

async function buildImage(vol: Buffer): Promise<{ store: FsChunkStore; rootDigest: Buffer }> {
  const store = await FsChunkStore.open(await dirs.make('blocksnap-nbd-'));
  cleanups.push(() => store.close());
  const writer = store.openWriter();
  const builder = await ImageIndexBuilder.create({ store, writer, volumeSize: vol.length, chunkSize: CS });
  for (let i = 0; i * CS < vol.length; i++) {
    const plain = vol.subarray(i * CS, Math.min(vol.length, (i + 1) * CS));
    if (plain.every((b) => b === 0)) {
      await builder.set(i, ZERO_DIGEST);
      continue;
    }
    const digest = sha256(plain);
    await writer.put(BLOB_CHUNK, digest, Buffer.from(plain));
    await builder.set(i, digest);
  }
  const { rootDigest } = await builder.finish();
  await writer.flush();
  return { store, rootDigest };
}

let volume: Buffer;
beforeAll(() => {
  volume = makeVolume();
});

async function serve(): Promise<NbdServer> {
  const { store, rootDigest } = await buildImage(volume);
  const server = await NbdServer.start({ resolve: fixedExport(NAME, readOnlyExport(await ImageSource.open(store, rootDigest))) });
  cleanups.push(() => server.close());
  return server;
}

/** A raw NBD client: exact reads with a deadline, no fixed sleeps. */
class RawClient {
  private buf = Buffer.alloc(0);
  private waiter: (() => void) | null = null;
  closed = false;
  private constructor(readonly socket: Socket) {
    socket.on('data', (b: Buffer) => {
      this.buf = Buffer.concat([this.buf, b]);
      this.waiter?.();
    });
    socket.on('close', () => {
      this.closed = true;
      this.waiter?.();
    });
    socket.on('error', () => undefined);
  }

  static async connect(port: number): Promise<RawClient> {
    const socket = connect(port, '127.0.0.1');
    cleanups.push(async () => socket.destroy());
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    return new RawClient(socket);
  }

  async read(n: number, ms = 5000): Promise<Buffer> {
    const deadline = Date.now() + ms;
    while (this.buf.length < n) {
      if (this.closed) throw new Error(`closed with ${this.buf.length}/${n} bytes`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timeout waiting for ${n} bytes`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiter = () => { clearTimeout(t); resolve(); };
      });
      this.waiter = null;
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  async waitClosed(ms = 5000): Promise<void> {
    const deadline = Date.now() + ms;
    while (!this.closed && Date.now() < deadline) {
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, deadline - Date.now());
        this.waiter = () => { clearTimeout(t); resolve(); };
      });
      this.waiter = null;
    }
    expect(this.closed).toBe(true);
  }

  send(b: Buffer): void { this.socket.write(b); }

  /** Option reply: [option, type, data]. */
  async optionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    expect(h.readBigUInt64BE(0)).toBe(0x0003e889045565a9n);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await this.read(h.readUInt32BE(16)) };
  }

  /** Handshake + (optionally) structured replies + GO; returns the export size and flags. */
  async open(name = NAME, structured = true): Promise<{ size: bigint; flags: number }> {
    const greeting = await this.read(18);
    expect(greeting.toString('latin1', 0, 16)).toBe('NBDMAGICIHAVEOPT');
    this.send(encodeClientFlags(3));
    if (structured) {
      this.send(encodeOption(Opt.STRUCTURED_REPLY));
      expect((await this.optionReply()).type).toBe(Rep.ACK);
    }
    this.send(encodeOption(Opt.GO, encodeExportRequest(name, [Info.BLOCK_SIZE])));
    let info: { size: bigint; flags: number } | undefined;
    for (;;) {
      const r = await this.optionReply();
      if (r.type === Rep.ACK) break;
      expect(r.type).toBe(Rep.INFO);
      if (r.data.readUInt16BE(0) === Info.EXPORT) info = { size: r.data.readBigUInt64BE(2), flags: r.data.readUInt16BE(10) };
    }
    return info!;
  }

  async simpleReply(): Promise<{ error: number; cookie: string }> {
    const h = await this.read(16);
    expect(h.readUInt32BE(0)).toBe(0x67446698);
    return { error: h.readUInt32BE(4), cookie: h.subarray(8, 16).toString('hex') };
  }

  /** Structured READ reply assembled into bytes (holes = zeros), or its error. */
  async structuredRead(offset: number, length: number): Promise<{ data: Buffer; error: number; holes: number }> {
    const data = Buffer.alloc(length);
    let error = 0;
    let holes = 0;
    for (;;) {
      const h = await this.read(20);
      expect(h.readUInt32BE(0)).toBe(0x668e33ef);
      const flags = h.readUInt16BE(4);
      const type = h.readUInt16BE(6);
      const p = await this.read(h.readUInt32BE(16));
      if (type === ReplyType.OFFSET_DATA) p.copy(data, Number(p.readBigUInt64BE(0)) - offset, 8);
      else if (type === ReplyType.OFFSET_HOLE) holes += p.readUInt32BE(8);
      else if (type === ReplyType.ERROR) error = p.readUInt32BE(0);
      else expect(type).toBe(ReplyType.NONE);
      if (flags & ReplyFlag.DONE) return { data, error, holes };
    }
  }
}

const cookie = (n: number): Buffer => {
  const b = Buffer.alloc(8);
  b.writeUInt32BE(n, 4);
  return b;
};

describe('NbdServer with the real libnbd clients', () => {
  it('nbdinfo reports the size, read-only and the advertised block sizes', async () => {
    const server = await serve();
    const { stdout } = await run('nbdinfo', ['--json', server.uri(NAME)], { timeout: 20_000 });
    const info = JSON.parse(stdout) as { exports: Array<Record<string, unknown>> };
    const ex = info.exports[0]!;
    expect(ex['export-size']).toBe(SIZE);
    expect(ex['is_read_only']).toBe(true);
    expect(ex['can_multi_conn']).toBe(true);
    expect(ex['can_flush']).toBe(true);
    expect(ex['block_size_minimum']).toBe(1);
    expect(ex['block_size_preferred']).toBe(CS);
  });

  it('nbdinfo --map shows exactly the ZERO chunks (and the ZERO page) as holes', async () => {
    const server = await serve();
    const { stdout } = await run('nbdinfo', ['--map', '--json', server.uri(NAME)], { timeout: 20_000 });
    const got: Array<{ offset: number; length: number; type: number }> = [];
    for (const e of JSON.parse(stdout) as Array<{ offset: number; length: number; type: number }>) {
      const last = got.at(-1);
      if (last && last.type === e.type && last.offset + last.length === e.offset) last.length += e.length;
      else got.push({ offset: e.offset, length: e.length, type: e.type });
    }
    const want: typeof got = [];
    for (let at = 0; at < SIZE; at += CS) {
      const len = Math.min(CS, SIZE - at);
      const type = volume.subarray(at, at + len).every((b) => b === 0) ? 3 : 0;
      const last = want.at(-1);
      if (last && last.type === type) last.length += len;
      else want.push({ offset: at, length: len, type });
    }
    expect(want.length).toBeGreaterThan(100);
    expect(got).toEqual(want);
  });

  it('nbdcopy produces a file byte-identical to the volume (holes and a partial last chunk included)', async () => {
    const server = await serve();
    const out = join(await dirs.make('blocksnap-nbd-out-'), 'out.raw');
    await run('nbdcopy', [server.uri(NAME), out], { timeout: 60_000 });
    const got = await readFile(out);
    expect(got.length).toBe(SIZE);
    expect(got.equals(volume)).toBe(true);
  });

  it('refuses a wrong export name and keeps serving the right one', async () => {
    const server = await serve();
    const wrong = run('nbdinfo', ['--json', server.uri('not-the-name')], { timeout: 20_000 });
    await expect(wrong).rejects.toMatchObject({ stderr: expect.stringMatching(/opt_go: server replied with error/) });
    const raw = await RawClient.connect(server.port);
    await raw.read(18);
    raw.send(encodeClientFlags(3));
    raw.send(encodeOption(Opt.INFO, encodeExportRequest('not-the-name')));
    expect((await raw.optionReply()).type).toBe(Rep.ERR_UNKNOWN);
    raw.send(encodeOption(Opt.GO, encodeExportRequest('guess')));
    expect((await raw.optionReply()).type).toBe(Rep.ERR_UNKNOWN);
    // LIST never enumerates the secret name.
    raw.send(encodeOption(Opt.LIST));
    expect(await raw.optionReply()).toMatchObject({ option: Opt.LIST, type: Rep.ACK, data: Buffer.alloc(0) });
    raw.send(encodeOption(77));
    expect((await raw.optionReply()).type).toBe(Rep.ERR_UNSUP);
    const { stdout } = await run('nbdinfo', ['--size', server.uri(NAME)], { timeout: 20_000 });
    expect(Number(stdout.trim())).toBe(SIZE);
  });

  it('refuses writes: nbdcopy into the export fails, the image is unchanged', async () => {
    const server = await serve();
    const src = join(await dirs.make('blocksnap-nbd-src-'), 'src.raw');
    await writeFile(src, Buffer.alloc(SIZE, 0x55));
    await expect(run('nbdcopy', [src, server.uri(NAME)], { timeout: 30_000 })).rejects.toMatchObject({
      stderr: expect.stringMatching(/read-only/),
    });
    const out = join(await dirs.make('blocksnap-nbd-out-'), 'out.raw');
    await run('nbdcopy', [server.uri(NAME), out], { timeout: 60_000 });
    expect((await readFile(out)).equals(volume)).toBe(true);
  });
});

describe('NbdServer over a raw socket', () => {
  it('answers WRITE, TRIM, WRITE_ZEROES with EPERM, FLUSH with success, unknown commands with EINVAL, and keeps serving', async () => {
    const server = await serve();
    const c = await RawClient.connect(server.port);
    const { size, flags } = await c.open(NAME, false);
    expect(size).toBe(BigInt(SIZE));
    expect(flags & TransmitFlag.READ_ONLY).toBeTruthy();
    c.send(encodeRequest({ type: Cmd.WRITE, cookie: cookie(1), offset: 0, length: 512, payload: Buffer.alloc(512, 1) }));
    expect(await c.simpleReply()).toEqual({ error: NbdErrno.EPERM, cookie: cookie(1).toString('hex') });
    c.send(encodeRequest({ type: Cmd.TRIM, cookie: cookie(2), offset: 0, length: 4096 }));
    expect((await c.simpleReply()).error).toBe(NbdErrno.EPERM);
    c.send(encodeRequest({ type: Cmd.WRITE_ZEROES, cookie: cookie(3), offset: 0, length: 4096 }));
    expect((await c.simpleReply()).error).toBe(NbdErrno.EPERM);
    c.send(encodeRequest({ type: Cmd.FLUSH, cookie: cookie(4), offset: 0, length: 0 }));
    expect((await c.simpleReply()).error).toBe(0);
    c.send(encodeRequest({ type: 42, cookie: cookie(5), offset: 0, length: 0 }));
    expect((await c.simpleReply()).error).toBe(NbdErrno.EINVAL);
    // Simple-reply READ (no structured replies negotiated), unaligned, crossing chunks.
    c.send(encodeRequest({ type: Cmd.READ, cookie: cookie(6), offset: 4095, length: 9000 }));
    expect((await c.simpleReply()).error).toBe(0);
    expect((await c.read(9000)).equals(volume.subarray(4095, 4095 + 9000))).toBe(true);
    c.send(encodeRequest({ type: Cmd.DISC, cookie: cookie(7), offset: 0, length: 0 }));
    await c.waitClosed();
  });

  it('structured READs: unaligned, crossing chunks and the ZERO page, zero chunks as holes, past the end → EINVAL', async () => {
    const server = await serve();
    const c = await RawClient.connect(server.port);
    await c.open();
    const cases: Array<[number, number]> = [
      [1, 1],
      [4095, 2],
      [3 * CS - 17, 3 * CS + 100],
      [1020 * CS + 5, 1100 * CS],
      [SIZE - 1500, 1500],
      [SIZE, 0],
    ];
    for (const [offset, length] of cases) {
      c.send(encodeRequest({ type: Cmd.READ, cookie: cookie(offset), offset, length }));
      const r = await c.structuredRead(offset, length);
      expect(r.error, `${offset}+${length}`).toBe(0);
      expect(r.data.equals(volume.subarray(offset, offset + length)), `${offset}+${length}`).toBe(true);
    }
    c.send(encodeRequest({ type: Cmd.READ, cookie: cookie(9), offset: 1024 * CS, length: 1024 * CS }));
    expect((await c.structuredRead(1024 * CS, 1024 * CS)).holes).toBe(1024 * CS);
    c.send(encodeRequest({ type: Cmd.READ, cookie: cookie(10), offset: SIZE - 10, length: 11 }));
    expect((await c.structuredRead(SIZE - 10, 11)).error).toBe(NbdErrno.EINVAL);
    c.send(encodeRequest({ type: Cmd.READ, cookie: cookie(11), offset: 2 ** 52, length: 1 }));
    expect((await c.structuredRead(0, 1)).error).toBe(NbdErrno.EINVAL);
    c.send(encodeRequest({ type: Cmd.READ, cookie: cookie(12), offset: 0, length: 100 }));
    expect((await c.structuredRead(0, 100)).data.equals(volume.subarray(0, 100))).toBe(true);
  });

  it('BLOCK_STATUS: EINVAL unless base:allocation was set; REQ_ONE gives one extent; LIST_META_CONTEXT offers it', async () => {
    const server = await serve();
    const plainC = await RawClient.connect(server.port);
    await plainC.open();
    plainC.send(encodeRequest({ type: Cmd.BLOCK_STATUS, cookie: cookie(1), offset: 0, length: 4096 }));
    expect((await plainC.structuredRead(0, 0)).error).toBe(NbdErrno.EINVAL);

    const c = await RawClient.connect(server.port);
    await c.read(18);
    c.send(encodeClientFlags(3));
    c.send(encodeOption(Opt.SET_META_CONTEXT, encodeMetaContextRequest(NAME, [BASE_ALLOCATION])));
    expect((await c.optionReply()).type).toBe(Rep.ERR_INVALID); // structured replies first
    c.send(encodeOption(Opt.STRUCTURED_REPLY));
    expect((await c.optionReply()).type).toBe(Rep.ACK);
    c.send(encodeOption(Opt.LIST_META_CONTEXT, encodeMetaContextRequest(NAME, [])));
    const listed = await c.optionReply();
    expect(listed.type).toBe(Rep.META_CONTEXT);
    expect(listed.data.toString('utf8', 4)).toBe(BASE_ALLOCATION);
    expect((await c.optionReply()).type).toBe(Rep.ACK);
    c.send(encodeOption(Opt.SET_META_CONTEXT, encodeMetaContextRequest('other', [BASE_ALLOCATION])));
    expect((await c.optionReply()).type).toBe(Rep.ERR_UNKNOWN);
    c.send(encodeOption(Opt.SET_META_CONTEXT, encodeMetaContextRequest(NAME, ['qemu:dirty-bitmap:x', BASE_ALLOCATION])));
    const set = await c.optionReply();
    expect(set.type).toBe(Rep.META_CONTEXT);
    const id = set.data.readUInt32BE(0);
    expect((await c.optionReply()).type).toBe(Rep.ACK);
    c.send(encodeOption(Opt.GO, encodeExportRequest(NAME)));
    while ((await c.optionReply()).type !== Rep.ACK);
    c.send(encodeRequest({ type: Cmd.BLOCK_STATUS, cookie: cookie(3), offset: 1024 * CS, length: 2048 * CS }));
    expect((await c.structuredRead(0, 0)).error).toBe(NbdErrno.EINVAL); // past the end
    // From the ZERO page into page 2, REQ_ONE: one extent only.
    c.send(encodeRequest({ type: Cmd.BLOCK_STATUS, flags: CmdFlag.REQ_ONE, cookie: cookie(2), offset: 1024 * CS, length: 1100 * CS }));
    const h = await c.read(20);
    expect(h.readUInt16BE(6)).toBe(ReplyType.BLOCK_STATUS);
    expect(h.readUInt16BE(4) & ReplyFlag.DONE).toBeTruthy();
    const p = await c.read(h.readUInt32BE(16));
    expect(p.readUInt32BE(0)).toBe(id);
    expect(p.length).toBe(12);
    // The ZERO page, then chunk 2048 (2048 % 7 = 4: data) stops the run.
    expect([p.readUInt32BE(4), p.readUInt32BE(8)]).toEqual([1024 * CS, 3]);
  });

  it('pipelined READs are all answered (by cookie, any order), and DISC comes after every one of them', async () => {
    const server = await serve();
    const c = await RawClient.connect(server.port);
    await c.open();
    const reqs = Array.from({ length: 40 }, (_, i) => ({ offset: (i * 7919 * 13) % (SIZE - 70_000), length: 1 + ((i * 4099) % 70_000) }));
    c.send(Buffer.concat(reqs.map((r, i) => encodeRequest({ type: Cmd.READ, cookie: cookie(i), offset: r.offset, length: r.length }))));
    c.send(encodeRequest({ type: Cmd.DISC, cookie: cookie(999), offset: 0, length: 0 }));
    const bufs = reqs.map((r) => Buffer.alloc(r.length));
    const open = new Set(reqs.map((_, i) => i));
    while (open.size > 0) {
      const h = await c.read(20);
      const i = h.readUInt32BE(12);
      const p = await c.read(h.readUInt32BE(16));
      expect(h.readUInt16BE(6)).not.toBe(ReplyType.ERROR);
      if (h.readUInt16BE(6) === ReplyType.OFFSET_DATA) p.copy(bufs[i]!, Number(p.readBigUInt64BE(0)) - reqs[i]!.offset, 8);
      if (h.readUInt16BE(4) & ReplyFlag.DONE) open.delete(i);
    }
    reqs.forEach((r, i) => expect(bufs[i]!.equals(volume.subarray(r.offset, r.offset + r.length)), `request ${i}`).toBe(true));
    await c.waitClosed();
  });

  it('a client that disconnects mid-request or sends garbage is dropped; others keep being served', async () => {
    const server = await serve();
    const a = await RawClient.connect(server.port);
    await a.open();
    a.send(encodeRequest({ type: Cmd.WRITE, cookie: cookie(1), offset: 0, length: 4096 }).subarray(0, 100));
    a.socket.destroy();
    const g = await RawClient.connect(server.port);
    await g.read(18);
    g.send(encodeClientFlags(3));
    g.send(Buffer.alloc(16, 0xee)); // not IHAVEOPT
    await g.waitClosed();
    const bad = await RawClient.connect(server.port);
    await bad.read(18);
    bad.send(encodeClientFlags(0x80)); // unknown client flag: the server closes
    await bad.waitClosed();
    const { stdout } = await run('nbdinfo', ['--size', server.uri(NAME)], { timeout: 20_000 });
    expect(Number(stdout.trim())).toBe(SIZE);
  });

  it('EXPORT_NAME (old negotiation ending) serves the right name and closes on another', async () => {
    const server = await serve();
    const ok = await RawClient.connect(server.port);
    await ok.read(18);
    ok.send(encodeClientFlags(1)); // no NO_ZEROES: 124 bytes of padding follow
    ok.send(encodeOption(Opt.EXPORT_NAME, Buffer.from(NAME)));
    const r = await ok.read(134);
    expect(r.readBigUInt64BE(0)).toBe(BigInt(SIZE));
    expect(r.subarray(10).equals(Buffer.alloc(124))).toBe(true);
    ok.send(encodeRequest({ type: Cmd.READ, cookie: cookie(1), offset: 10, length: 10 }));
    expect((await ok.simpleReply()).error).toBe(0);
    expect((await ok.read(10)).equals(volume.subarray(10, 20))).toBe(true);
    const no = await RawClient.connect(server.port);
    await no.read(18);
    no.send(encodeClientFlags(3));
    no.send(encodeOption(Opt.EXPORT_NAME, Buffer.from('x')));
    await no.waitClosed();
  });

  it('revoking an export (its `revoked` signal) closes every connection serving it at once; other exports and new clients go on', async () => {
    const { store, rootDigest } = await buildImage(volume);
    const exp = readOnlyExport(await ImageSource.open(store, rootDigest));
    const revoke = new AbortController();
    let released = 0;
    const revocable = { ...exp, revoked: revoke.signal, release: () => void released++ };
    const server = await NbdServer.start({ resolve: async (n) => (n === NAME ? revocable : n === 'other' ? exp : undefined) });
    cleanups.push(() => server.close());
    const a = await RawClient.connect(server.port);
    const b = await RawClient.connect(server.port);
    const other = await RawClient.connect(server.port);
    await a.open();
    await b.open(NAME, false);
    await other.open('other');
    a.send(encodeRequest({ type: Cmd.READ, cookie: cookie(1), offset: 0, length: 100 }));
    expect((await a.structuredRead(0, 100)).error).toBe(0);
    expect(server.connections).toBe(3);
    revoke.abort();
    // Before: nothing listened to a removal, both connections stayed open and kept being served.
    await a.waitClosed();
    await b.waitClosed();
    expect(released).toBe(2);
    other.send(encodeRequest({ type: Cmd.READ, cookie: cookie(2), offset: 10, length: 10 }));
    expect((await other.structuredRead(10, 10)).data.equals(volume.subarray(10, 20))).toBe(true);
    // A revoked export is no longer served: GO answers ERR_UNKNOWN (and its resolve is released).
    const late = await RawClient.connect(server.port);
    await late.read(18);
    late.send(encodeClientFlags(3));
    late.send(encodeOption(Opt.GO, encodeExportRequest(NAME, [])));
    expect((await late.optionReply()).type).toBe(Rep.ERR_UNKNOWN);
    expect(released).toBe(3);
  });

  it('close() drops connected clients and frees the port', async () => {
    const server = await serve();
    const c = await RawClient.connect(server.port);
    await c.open();
    expect(server.connections).toBe(1);
    await server.close();
    await c.waitClosed();
    await expect(RawClient.connect(server.port)).rejects.toMatchObject({ code: 'ECONNREFUSED' });
  });
});
