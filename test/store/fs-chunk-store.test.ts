import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, open, readdir, readFile, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import binding from 'zstd-napi/binding.js';
import { isBlocksnapError } from '../../proto/errors.js';
import { BLOB_PAGE } from '../../appliance/store/chunk-store.js';
import { FsChunkStore, type FsChunkStoreOptions } from '../../appliance/store/fs-chunk-store.js';
import { CODEC_NONE, CODEC_ZSTD, FOOTER_SIZE, packRelPath } from '../../appliance/store/pack-format.js';
import { listPackFiles, PackReader } from '../../appliance/store/pack-reader.js';
import { PackWriter } from '../../appliance/store/pack-writer.js';
import { zstdCompress, zstdDecompress } from '../../proto/shared/zstd.js';
import { compressibleChunk, makeBlob, randomChunk, sha256, TempDirs, type TestBlob } from '../../appliance/testing/store-fixtures.js';
import { chunkStoreContract, type ChunkStoreHarness } from './chunk-store.contract.js';

const dirs = new TempDirs();
const openStores: FsChunkStore[] = [];
afterEach(async () => {
  await Promise.allSettled(openStores.splice(0).map((s) => s.close()));
  await dirs.cleanup();
});

async function flipByte(file: string, at: number): Promise<void> {
  const fh = await open(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, at);
    b[0]! ^= 0x5a;
    await fh.write(b, 0, 1, at);
  } finally {
    await fh.close();
  }
}

function fsHarness(opts: FsChunkStoreOptions = {}): () => Promise<ChunkStoreHarness> {
  return async () => {
    const storeDir = join(await dirs.make(), 'store');
    const packFile = (id: string) => join(storeDir, 'packs', packRelPath(id));
    return {
      open: () => FsChunkStore.open(storeDir, opts),
      corruptPayload: (loc, byteIndex = 0) => flipByte(packFile(loc.pack), loc.offset + byteIndex),
      crash: {
        async packWithoutIndex(blobs: TestBlob[]) {
          await mkdir(join(storeDir, 'tmp'), { recursive: true });
          const w = new PackWriter(join(storeDir, 'tmp'), join(storeDir, 'packs'));
          for (const b of blobs) await w.append(b.digest, b.type, CODEC_ZSTD, b.plain.length, b.compressed);
          return (await w.finish()).id;
        },
        async damageFooter(pack) {
          const file = packFile(pack);
          await flipByte(file, (await stat(file)).size - FOOTER_SIZE + 20); // inside the trailer checksum
        },
        async leaveTempPack() {
          await mkdir(join(storeDir, 'tmp'), { recursive: true });
          await writeFile(join(storeDir, 'tmp', 'pack-1-dead.tmp'), randomChunk(5000));
        },
        tempEntries: () => readdir(join(storeDir, 'tmp')),
        packPresent: (pack) => stat(packFile(pack)).then(() => true, () => false),
      },
      destroy: async () => undefined, // the temp dir goes in afterEach
    };
  };
}

chunkStoreContract('FsChunkStore', fsHarness());
chunkStoreContract('FsChunkStore, 64 KiB packs and 4 KiB write buffer', fsHarness({ targetPackSize: 64 * 1024, writeBufferSize: 4096 }));

async function openStore(opts: FsChunkStoreOptions = {}): Promise<{ store: FsChunkStore; dir: string }> {
  const dir = join(await dirs.make(), 'store');
  const store = await FsChunkStore.open(dir, opts);
  openStores.push(store);
  return { store, dir };
}

describe('FsChunkStore on disk', () => {
  it('stores the agent frame as-is, incompressible data plain, and names packs by their SHA-256', async () => {
    const { store, dir } = await openStore();
    const squeezed = makeBlob(compressibleChunk(64 * 1024));
    const noise = makeBlob(randomChunk(64 * 1024));
    const page = makeBlob(compressibleChunk(32 * 1024), BLOB_PAGE);
    const w = store.openWriter();
    await w.put(1, squeezed.digest, squeezed.plain, squeezed.compressed);
    await w.put(1, noise.digest, noise.plain, noise.compressed);
    await w.put(BLOB_PAGE, page.digest, page.plain);
    const written = await w.flush();

    const [pack] = await listPackFiles(join(dir, 'packs'));
    const file = await readFile(pack!.path);
    expect(written).toBe(file.length);
    expect(createHash('sha256').update(file).digest('hex')).toBe(pack!.id);
    const at = (b: TestBlob) => {
      const loc = store.locate(b.digest)!;
      return { loc, bytes: file.subarray(loc.offset, loc.offset + loc.storedLength) };
    };
    expect(at(squeezed).loc.codec).toBe(CODEC_ZSTD);
    expect(at(squeezed).bytes.equals(squeezed.compressed)).toBe(true);
    expect(at(noise).loc.codec).toBe(CODEC_NONE);
    expect(at(noise).bytes.equals(noise.plain)).toBe(true);
    expect(at(page).loc.codec).toBe(CODEC_ZSTD);
    expect(zstdDecompress(at(page).bytes, page.plain.length).equals(page.plain)).toBe(true);

    const reader = await PackReader.open(pack!.path, pack!.id);
    try {
      const entries = await reader.entries();
      expect(entries.map((e) => e.digest.toString('hex'))).toEqual([squeezed, noise, page].map((b) => b.digest.toString('hex')));
      for (const { digest, ...where } of entries) expect(store.locate(digest)).toEqual({ pack: pack!.id, ...where });
    } finally {
      await reader.close();
    }
  });

  it('rolls over to a new pack at the target size and keeps every blob readable', async () => {
    const target = 256 * 1024;
    const { store, dir } = await openStore({ targetPackSize: target, writeBufferSize: 16 * 1024 });
    const blobs = Array.from({ length: 60 }, () => makeBlob(randomChunk(16 * 1024)));
    const w = store.openWriter();
    for (const b of blobs) await w.put(1, b.digest, b.plain, b.compressed);
    const written = await w.flush();
    const packs = await listPackFiles(join(dir, 'packs'));
    expect(packs.length).toBeGreaterThanOrEqual(4);
    let total = 0;
    for (const p of packs) {
      const size = (await stat(p.path)).size;
      expect(size).toBeLessThanOrEqual(target);
      total += size;
      expect(createHash('sha256').update(await readFile(p.path)).digest('hex')).toBe(p.id);
    }
    expect(written).toBe(total);
    expect(store.stats()).toEqual({ packs: packs.length, blobs: blobs.length, bytes: total });
    for (const b of blobs) expect((await store.get(b.digest)).equals(b.plain)).toBe(true);
  });

  it('takes many puts in flight on one writer without losing or doubling a blob', async () => {
    const { store } = await openStore({ targetPackSize: 128 * 1024, writeBufferSize: 8192 });
    const blobs = Array.from({ length: 80 }, (_, i) => makeBlob(i % 3 ? randomChunk(6000) : compressibleChunk(6000)));
    const w = store.openWriter();
    const results = await Promise.all([...blobs, ...blobs].map((b) => w.put(1, b.digest, b.plain, b.compressed)));
    expect(results.filter((r) => r.stored).length).toBe(blobs.length);
    await w.flush();
    expect(store.stats().blobs).toBe(blobs.length);
    await Promise.all(blobs.map(async (b) => expect((await store.get(b.digest)).equals(b.plain)).toBe(true)));
  });

  it('keeps read handles bounded while reading across many packs', async () => {
    const { store } = await openStore({ targetPackSize: 16 * 1024, readHandles: 3 });
    const blobs = Array.from({ length: 30 }, () => makeBlob(randomChunk(10 * 1024)));
    const w = store.openWriter();
    for (const b of blobs) await w.put(1, b.digest, b.plain);
    await w.flush();
    expect(store.stats().packs).toBe(30);
    const fds = async () => (await readdir('/proc/self/fd')).length;
    const before = await fds();
    for (let round = 0; round < 3; round++) {
      await Promise.all(blobs.map(async (b) => expect((await store.get(b.digest)).equals(b.plain)).toBe(true)));
    }
    expect(await fds()).toBeLessThanOrEqual(before + 3);
  });

  it('reindex rebuilds the same rows from the trailers and names a pack whose footer is damaged', async () => {
    const { store, dir } = await openStore({ targetPackSize: 64 * 1024 });
    const blobs = Array.from({ length: 20 }, (_, i) => makeBlob(i % 2 ? randomChunk(9000) : compressibleChunk(9000)));
    const w = store.openWriter();
    for (const b of blobs) await w.put(1, b.digest, b.plain, b.compressed);
    await w.flush();
    const rows = blobs.map((b) => store.locate(b.digest));
    const stats = store.stats();
    expect(await store.reindex()).toEqual({ packs: stats.packs, blobs: blobs.length, skipped: [] });
    expect(blobs.map((b) => store.locate(b.digest))).toEqual(rows);
    expect(store.stats()).toEqual(stats);

    // A damaged footer: reindex skips that pack (quarantined, reported) and indexes the rest.
    const victim = rows[0]!.pack;
    await flipByte(join(dir, 'packs', packRelPath(victim)), (await stat(join(dir, 'packs', packRelPath(victim)))).size - 3);
    const r = await store.reindex();
    expect(r.packs).toBe(stats.packs - 1);
    expect(r.skipped).toEqual([expect.objectContaining({ pack: victim, quarantinedTo: expect.stringMatching(/^quarantine\//) })]);
    expect(r.skipped[0]!.reason).toContain(victim);
    for (const [i, b] of blobs.entries()) expect(store.has(b.digest)).toBe(rows[i]!.pack !== victim);
    const why = JSON.parse(await readFile(join(dir, '..', `${r.skipped[0]!.quarantinedTo}.why.json`), 'utf8'));
    expect(why).toMatchObject({ object: `pack ${victim}`, kind: 'pack', from: `store/packs/${packRelPath(victim)}` });
    expect(Date.parse(why.at)).toBeGreaterThan(Date.now() - 60_000);
  });

  it('close aborts writers with unflushed blobs and leaves no temp file', async () => {
    const { store, dir } = await openStore();
    const b = makeBlob(randomChunk(30000));
    const w = store.openWriter();
    await w.put(1, b.digest, b.plain);
    expect((await readdir(join(dir, 'tmp'))).length).toBe(1);
    await store.close();
    expect(await readdir(join(dir, 'tmp'))).toEqual([]);
    const again = await FsChunkStore.open(dir);
    openStores.push(again);
    expect(again.has(b.digest)).toBe(false);
  });

  it('fails a put with E_STORE_IO when the temp area is gone, and the writer can still be aborted', async () => {
    const { store, dir } = await openStore();
    await rm(join(dir, 'tmp'), { recursive: true });
    const b = makeBlob(randomChunk(3000));
    const w = store.openWriter();
    const err = await w.put(1, b.digest, b.plain).catch((e: unknown) => e);
    expect(isBlocksnapError(err, 'E_STORE_IO')).toBe(true);
    await w.abort();
    expect(store.has(b.digest)).toBe(false);
  });

  it('reports a truncated pack as corrupt, naming pack and blob', async () => {
    const { store, dir } = await openStore();
    const b = makeBlob(randomChunk(20000));
    const w = store.openWriter();
    await w.put(1, b.digest, b.plain);
    await w.flush();
    const loc = store.locate(b.digest)!;
    await truncate(join(dir, 'packs', packRelPath(loc.pack)), loc.offset + 100);
    const err = await store.get(b.digest).catch((e: unknown) => e);
    expect(isBlocksnapError(err, 'E_STORE_CORRUPT')).toBe(true);
    expect((err as Error).message).toContain(loc.pack);
    expect((err as Error).message).toContain(b.digest.toString('hex'));
  });
});

describe('FsChunkStore after kill -9', () => {
  let child: ChildProcess | undefined;
  afterEach(() => {
    if (child && child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    child = undefined;
  });

  it('keeps what was flushed and drops the temp pack of the killed writer', async () => {
    const dir = join(await dirs.make(), 'store');
    const storeModule = fileURLToPath(new URL('../../appliance/store/fs-chunk-store.ts', import.meta.url));
    // The child flushes 50 blobs, reports their digests, then keeps putting without flushing.
    const script = `
      import { createHash, randomBytes } from 'node:crypto';
      import { FsChunkStore } from ${JSON.stringify(storeModule)};
      const store = await FsChunkStore.open(process.argv[1], { targetPackSize: 2 ** 30 });
      const w = store.openWriter();
      const put = async () => { const p = randomBytes(16384); const d = createHash('sha256').update(p).digest(); await w.put(1, d, p); return d.toString('hex'); };
      const durable = [];
      for (let i = 0; i < 50; i++) durable.push(await put());
      await w.flush();
      process.stdout.write(JSON.stringify(durable) + '\\n');
      for (;;) await put();`;
    child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script, dir], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const line = await new Promise<string>((resolve, reject) => {
      let out = '';
      child!.stdout!.on('data', (b: Buffer) => {
        out += b.toString();
        if (out.includes('\n')) resolve(out.split('\n')[0]!);
      });
      child!.on('exit', (code) => reject(new Error(`child exited ${code} before flushing`)));
    });
    const durable = JSON.parse(line) as string[];
    while ((await readdir(join(dir, 'tmp'))).length === 0) await new Promise((r) => setTimeout(r, 10));
    const exited = new Promise((r) => child!.on('exit', r));
    child.kill('SIGKILL');
    await exited;
    expect((await readdir(join(dir, 'tmp'))).length).toBeGreaterThan(0); // the half-written pack

    const store = await FsChunkStore.open(dir);
    openStores.push(store);
    expect(await readdir(join(dir, 'tmp'))).toEqual([]);
    expect(store.stats().blobs).toBe(durable.length);
    for (const hex of durable) {
      const plain = await store.get(Buffer.from(hex, 'hex'));
      expect(sha256(plain).toString('hex')).toBe(hex);
    }
  });
});

/** A frame without a content size in its header, as a streaming compressor writes. */
function frameWithoutSize(plain: Buffer): Buffer {
  const cctx = new binding.CCtx();
  cctx.setParameter(binding.CParameter.contentSizeFlag, 0);
  const out = Buffer.alloc(binding.compressBound(plain.length));
  return out.subarray(0, cctx.compress2(out, plain));
}

describe('zstd bomb refusal', () => {
  const bomb = Buffer.alloc(64 * 1024 * 1024, 7); // 64 MiB that compresses to a few KiB

  it('refuses a frame whose header declares more than the expected length', () => {
    const frame = zstdCompress(bomb);
    expect(frame.length).toBeLessThan(64 * 1024);
    const err = (() => {
      try {
        zstdDecompress(frame, 64 * 1024);
      } catch (e) {
        return e;
      }
    })();
    expect(isBlocksnapError(err, 'E_FORMAT')).toBe(true);
  });

  it('refuses a frame without a declared size that expands past the limit', () => {
    const frame = frameWithoutSize(bomb);
    expect(binding.getFrameContentSize(frame)).toBeNull();
    expect(() => zstdDecompress(frame, 64 * 1024)).toThrow(/refused|more than/);
    expect(() => zstdDecompress(frameWithoutSize(Buffer.alloc(1000, 3)), 999)).toThrow();
    expect(zstdDecompress(frameWithoutSize(Buffer.alloc(1000, 3)), 1000).equals(Buffer.alloc(1000, 3))).toBe(true);
  });

  it('a stored frame that expands past its plain length reads as E_STORE_CORRUPT, not a bomb', async () => {
    const { store } = await openStore();
    const plain = Buffer.alloc(64 * 1024, 7);
    const w = store.openWriter();
    // A lying caller: the frame holds 64 MiB but claims to be this 64 KiB chunk.
    await w.put(1, sha256(plain), plain, frameWithoutSize(bomb));
    await w.flush();
    const err = await store.get(sha256(plain)).catch((e: unknown) => e);
    expect(isBlocksnapError(err, 'E_STORE_CORRUPT')).toBe(true);
    expect((err as Error).message).toContain(store.locate(sha256(plain))!.pack);
  });
});
