/**
 * A writable export (image + copy-on-write overlay) against the real clients:
 * nbdinfo, nbdinfo --map, nbdcopy, nbdfuse (fuse3), the libnbd Python binding
 * (python3-libnbd), plus a raw socket for what those never send. The image is
 * built once per file in a real FsChunkStore; each test gets a new overlay.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { connect } from 'node:net';
import { open, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { FsChunkStore } from '../../appliance/store/fs-chunk-store.js';
import { verifyImage } from '../../appliance/ops/verify-image.js';
import type { ManifestStore } from '../../appliance/store/manifest-store.js';
import { NbdServer, fixedExport } from '../../appliance/nbd/nbd-server.js';
import { ImageSource } from '../../appliance/nbd/image-source.js';
import { CowOverlay } from '../../appliance/nbd/cow-overlay.js';
import { writableExport } from '../../appliance/nbd/writable-export.js';
import type { NbdExport, NbdExportResolver } from '../../appliance/nbd/nbd-export.js';
import { encodeClientFlags, encodeExportRequest, encodeOption, encodeRequest } from '../../appliance/nbd/nbd-codec.js';
import { Cmd, CmdFlag, NbdErrno, Opt, Rep, TransmitFlag } from '../../appliance/nbd/nbd-layout.js';
import { TempDirs, randomChunk } from '../../appliance/testing/store-fixtures.js';
import { storeFingerprint as fingerprintOf, storeRandomImage } from '../../appliance/testing/stored-image.js';

const run = promisify(execFile);
const CS = 65536;
const CHUNKS = 64;
const SIZE = CHUNKS * CS - 3000; // a short last chunk
const NAME = '5c1e0f6a9b3d4e2f8a7b6c5d4e3f2a1b';

const dirs = new TempDirs();
const cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => undefined);
});

let store: FsChunkStore;
let rootDigest: Buffer;
let volume: Buffer;
let storeDir: string;

beforeAll(async () => {
  storeDir = await dirs.make('blocksnap-nbdw-store-');
  store = await FsChunkStore.open(storeDir);
  ({ rootDigest, volume } = await storeRandomImage(store, { size: SIZE, chunkSize: CS, zeroAt: (i) => i % 4 === 1 }));
});

afterAll(async () => {
  await store?.close();
  await dirs.cleanup();
});

/** Name and bytes of every file under the store: the image's chunks must never change. */
const storeFingerprint = (): Promise<string> => fingerprintOf(storeDir);

interface Served {
  server: NbdServer;
  overlay: CowOverlay;
  dir: string;
  uri: string;
  /** resolves minus releases */
  live: () => number;
  peers: string[];
}

async function serveWritable(): Promise<Served> {
  const source = await ImageSource.open(store, rootDigest);
  const dir = join(await dirs.make('blocksnap-nbdw-ov-'), 'overlay');
  const overlay = await CowOverlay.create(dir, { volumeSize: source.size, chunkSize: source.chunkSize, rootDigest });
  cleanups.push(() => overlay.close());
  const base = writableExport(source, overlay);
  let live = 0;
  const peers: string[] = [];
  const resolve: NbdExportResolver = async (name, peer) => {
    if (name !== NAME) return undefined;
    live++;
    peers.push(peer.address);
    const exp: NbdExport = { ...base, release: () => { live--; } };
    return exp;
  };
  const server = await NbdServer.start({ resolve });
  cleanups.push(() => server.close());
  return { server, overlay, dir, uri: server.uri(NAME), live: () => live, peers };
}

async function waitFor(cond: () => boolean | Promise<boolean>, ms = 20_000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`${what} not met in ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function copyOut(uri: string): Promise<Buffer> {
  const out = join(await dirs.make('blocksnap-nbdw-out-'), 'out.raw');
  await run('nbdcopy', [uri, out], { timeout: 60_000 });
  return readFile(out);
}

/** Runs a Python script with libnbd; argv[1] is the URI. Prints JSON. */
async function py(script: string, ...args: string[]): Promise<unknown> {
  // Debian's interpreter: python3-libnbd installs the binding for it only.
  const { stdout } = await run('/usr/bin/python3', ['-c', script, ...args], { timeout: 60_000 });
  return JSON.parse(stdout);
}

describe('writable export with the real libnbd clients', () => {
  it('nbdinfo: writable, trim, zero, fua, flush, multi-conn', async () => {
    const s = await serveWritable();
    const { stdout } = await run('nbdinfo', ['--json', s.uri], { timeout: 20_000 });
    const ex = (JSON.parse(stdout) as { exports: Array<Record<string, unknown>> }).exports[0]!;
    expect(ex).toMatchObject({
      'export-size': SIZE,
      is_read_only: false,
      can_trim: true,
      can_zero: true,
      can_fua: true,
      can_flush: true,
      can_multi_conn: true,
      block_size_preferred: CS,
    });
    await waitFor(() => s.live() === 0, 10_000, 'every resolved export released');
    expect(s.peers.every((p) => p === '127.0.0.1')).toBe(true);
  });

  it('libnbd: unaligned writes read back, trim/zero read as zeros, reads and writes past the end fail, two connections see each other after flush', async () => {
    const s = await serveWritable();
    const before = await storeFingerprint();
    const result = (await py(
      `
import json, sys, nbd
uri = sys.argv[1]
a = nbd.NBD(); a.connect_uri(uri)
b = nbd.NBD(); b.connect_uri(uri)
out = {}
a.pwrite(b"x" * 1000, 65536 - 300)                      # crosses chunks 0/1 (1 is ZERO in the image)
a.pwrite(b"y" * 7, 3 * 65536 + 11, nbd.CMD_FLAG_FUA)     # partial, FUA
a.flush()
out["b_sees"] = b.pread(1000, 65536 - 300) == b"x" * 1000 and b.pread(7, 3 * 65536 + 11) == b"y" * 7
a.trim(2 * 65536, 4 * 65536 + 5)                          # (count, offset): partial 4, whole 5, partial 6
a.zero(3000, 6 * 65536 + 100)                             # partial 6
a.zero(65536, 8 * 65536, nbd.CMD_FLAG_NO_HOLE)           # whole chunk 8, kept allocated
a.flush()
out["trimmed"] = b.pread(2 * 65536, 4 * 65536 + 5) == bytes(2 * 65536)
out["zeroed"] = b.pread(3000, 6 * 65536 + 100) == bytes(3000)
out["zeroed_nohole"] = b.pread(65536, 8 * 65536) == bytes(65536)
size = a.get_size()
try:
    a.pread(11, size - 10); out["read_past_end"] = "ok"
except nbd.Error as e:
    out["read_past_end"] = e.errno
try:
    a.pwrite(b"z" * 11, size - 10); out["write_past_end"] = "ok"
except nbd.Error as e:
    out["write_past_end"] = e.errno
out["tail"] = a.pread(10, size - 10).hex()
a.shutdown(); b.shutdown()
print(json.dumps(out))
`,
      s.uri,
    )) as Record<string, unknown>;
    expect(result).toMatchObject({ b_sees: true, trimmed: true, zeroed: true, zeroed_nohole: true });
    // libnbd checks bounds itself (EINVAL) before sending; the raw-socket test covers the server's answer.
    expect(result['read_past_end']).not.toBe('ok');
    expect(result['write_past_end']).not.toBe('ok');
    expect(result['tail']).toBe(volume.subarray(SIZE - 10).toString('hex'));
    const model = Buffer.from(volume);
    model.fill('x', CS - 300, CS + 700);
    model.fill('y', 3 * CS + 11, 3 * CS + 18);
    model.fill(0, 4 * CS + 5, 6 * CS + 5);
    model.fill(0, 6 * CS + 100, 6 * CS + 3100);
    model.fill(0, 8 * CS, 9 * CS);
    expect((await copyOut(s.uri)).equals(model)).toBe(true);
    // The image itself: store files byte-identical, verify clean, reads as before.
    expect(await storeFingerprint()).toBe(before);
    const manifests = { get: async () => ({ rootDigest: rootDigest.toString('hex') }) } as unknown as ManifestStore;
    const report = await verifyImage(store, manifests, 'img', rootDigest.toString('hex'));
    expect(report).toMatchObject({ ok: true, bad: [] });
    const fresh = await ImageSource.open(store, rootDigest);
    const again = Buffer.alloc(SIZE);
    for (const seg of await fresh.read(0, SIZE)) if ('data' in seg) seg.data.copy(again, seg.offset);
    expect(again.equals(volume)).toBe(true);
  });

  it('nbdcopy into the export, then out: byte-identical; nbdinfo --map shows zeroed chunks as holes and written ones as data', async () => {
    const s = await serveWritable();
    const src = join(await dirs.make('blocksnap-nbdw-src-'), 'src.raw');
    const data = Buffer.alloc(SIZE);
    for (let i = 0; i < CHUNKS; i++) if (i % 3 !== 0) randomChunk(CS).copy(data, i * CS);
    await writeFile(src, data);
    await run('nbdcopy', [src, s.uri], { timeout: 60_000 });
    expect((await copyOut(s.uri)).equals(data)).toBe(true);
    const { stdout } = await run('nbdinfo', ['--map', '--json', s.uri], { timeout: 20_000 });
    const map = JSON.parse(stdout) as Array<{ offset: number; length: number; type: number }>;
    for (let i = 0; i < CHUNKS; i++) {
      const at = i * CS;
      const e = map.find((m) => m.offset <= at && at < m.offset + m.length)!;
      // nbdcopy zeroes (or skips) all-zero chunks: never data in the map unless the image had data there.
      if (i % 3 !== 0) expect(e.type, `chunk ${i}`).toBe(0);
      else expect(e.type === 3 || volume.subarray(at, at + CS).some((b) => b !== 0), `chunk ${i}`).toBe(true);
    }
  });

  it('nbdfuse: the export as a file, written at odd offsets and fsynced, reads back through another client; unmounted with fusermount3 -u', async () => {
    const s = await serveWritable();
    const mnt = await dirs.make('blocksnap-nbdw-fuse-');
    const proc: ChildProcess = spawn('nbdfuse', [mnt, s.uri], { stdio: 'ignore' });
    let exited = false;
    proc.on('exit', () => { exited = true; });
    cleanups.push(async () => {
      await run('fusermount3', ['-u', mnt]).catch(() => undefined);
      if (!exited) proc.kill('SIGTERM');
      await waitFor(() => exited, 10_000, 'nbdfuse exit');
    });
    const file = join(mnt, 'nbd');
    await waitFor(async () => (await stat(file).catch(() => undefined))?.size === SIZE, 20_000, 'nbdfuse file');
    const fh = await open(file, 'r+');
    try {
      await fh.write(Buffer.alloc(5000, 0x61), 0, 5000, 10 * CS - 17);
      await fh.sync();
      const back = Buffer.alloc(20);
      await fh.read(back, 0, 20, 10 * CS - 27);
      expect(back.equals(Buffer.concat([volume.subarray(10 * CS - 27, 10 * CS - 17), Buffer.alloc(10, 0x61)]))).toBe(true);
    } finally {
      await fh.close();
    }
    await run('fusermount3', ['-u', mnt], { timeout: 20_000 });
    await waitFor(() => exited, 20_000, 'nbdfuse exit after unmount');
    const model = Buffer.from(volume);
    model.fill(0x61, 10 * CS - 17, 10 * CS - 17 + 5000);
    expect((await copyOut(s.uri)).equals(model)).toBe(true);
  });
});

describe('writable export over a raw socket', () => {
  async function rawOpen(port: number): Promise<{ send: (b: Buffer) => void; read: (n: number) => Promise<Buffer>; destroy: () => void; closed: () => boolean }> {
    const socket = connect(port, '127.0.0.1');
    cleanups.push(async () => socket.destroy());
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    let buf = Buffer.alloc(0);
    let closed = false;
    socket.on('data', (b: Buffer) => { buf = Buffer.concat([buf, b]); });
    socket.on('close', () => { closed = true; });
    socket.on('error', () => undefined);
    const read = async (n: number): Promise<Buffer> => {
      await waitFor(() => buf.length >= n || closed, 10_000, `${n} bytes`);
      if (buf.length < n) throw new Error('closed');
      const out = buf.subarray(0, n);
      buf = buf.subarray(n);
      return out;
    };
    await read(18);
    socket.write(encodeClientFlags(3));
    socket.write(encodeOption(Opt.GO, encodeExportRequest(NAME)));
    let flags = 0;
    for (;;) {
      const h = await read(20);
      const d = await read(h.readUInt32BE(16));
      if (h.readUInt32BE(12) === Rep.ACK) break;
      if (d.readUInt16BE(0) === 0) flags = d.readUInt16BE(10);
    }
    expect(flags & TransmitFlag.READ_ONLY).toBe(0);
    expect(flags & (TransmitFlag.SEND_TRIM | TransmitFlag.SEND_WRITE_ZEROES | TransmitFlag.SEND_FUA | TransmitFlag.CAN_MULTI_CONN)).toBe(
      TransmitFlag.SEND_TRIM | TransmitFlag.SEND_WRITE_ZEROES | TransmitFlag.SEND_FUA | TransmitFlag.CAN_MULTI_CONN,
    );
    return { send: (b) => socket.write(b), read, destroy: () => socket.destroy(), closed: () => closed };
  }
  const cookie = (n: number): Buffer => Buffer.alloc(8, n);
  const reply = async (c: { read: (n: number) => Promise<Buffer> }): Promise<{ error: number; cookie: number }> => {
    const h = await c.read(16);
    expect(h.readUInt32BE(0)).toBe(0x67446698);
    return { error: h.readUInt32BE(4), cookie: h[8]! };
  };

  it('writes past the end → ENOSPC, unknown command → EINVAL, zero-length write and flush → OK; the connection goes on', async () => {
    const s = await serveWritable();
    const c = await rawOpen(s.server.port);
    c.send(encodeRequest({ type: Cmd.WRITE, cookie: cookie(1), offset: SIZE - 2, length: 3, payload: Buffer.from('abc') }));
    expect(await reply(c)).toEqual({ error: NbdErrno.ENOSPC, cookie: 1 });
    c.send(encodeRequest({ type: Cmd.WRITE_ZEROES, cookie: cookie(2), offset: SIZE, length: 1 }));
    expect(await reply(c)).toEqual({ error: NbdErrno.ENOSPC, cookie: 2 });
    c.send(encodeRequest({ type: Cmd.TRIM, flags: CmdFlag.FUA, cookie: cookie(3), offset: 2 ** 52, length: 1 }));
    expect(await reply(c)).toEqual({ error: NbdErrno.ENOSPC, cookie: 3 });
    c.send(encodeRequest({ type: 99, cookie: cookie(4), offset: 0, length: 0 }));
    expect(await reply(c)).toEqual({ error: NbdErrno.EINVAL, cookie: 4 });
    c.send(encodeRequest({ type: Cmd.WRITE, cookie: cookie(5), offset: 7, length: 0 }));
    expect(await reply(c)).toEqual({ error: 0, cookie: 5 });
    c.send(encodeRequest({ type: Cmd.WRITE, flags: CmdFlag.FUA, cookie: cookie(6), offset: SIZE - 3, length: 3, payload: Buffer.from('end') }));
    expect(await reply(c)).toEqual({ error: 0, cookie: 6 });
    c.send(encodeRequest({ type: Cmd.READ, cookie: cookie(7), offset: SIZE - 4, length: 4 }));
    expect(await reply(c)).toEqual({ error: 0, cookie: 7 });
    expect((await c.read(4)).equals(Buffer.concat([volume.subarray(SIZE - 4, SIZE - 3), Buffer.from('end')]))).toBe(true);
  });

  it('a client that disconnects in the middle of a WRITE payload: nothing of it lands, its export is released, others are served', async () => {
    const s = await serveWritable();
    const c = await rawOpen(s.server.port);
    const req = encodeRequest({ type: Cmd.WRITE, cookie: cookie(1), offset: 0, length: 3 * CS, payload: Buffer.alloc(3 * CS, 0x42) });
    c.send(req.subarray(0, 28 + CS + 5));
    await waitFor(() => s.live() === 1, 10_000, 'connected');
    c.destroy();
    await waitFor(() => s.live() === 0, 10_000, 'export released');
    expect((await copyOut(s.uri)).equals(volume)).toBe(true);
  });
});
