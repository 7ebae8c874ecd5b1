/**
 * The copy-on-write overlay (its frozen layout, durability order, identity
 * check) and the writable export over it, against a model Buffer, on real
 * files in a temp dir and an image in a MemoryChunkStore.
 */
import { randomBytes } from 'node:crypto';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { BLOB_CHUNK, ZERO_DIGEST } from '../../appliance/store/chunk-store.js';
import { ImageIndexBuilder } from '../../appliance/store/image-index.js';
import { ImageSource, type Segment } from '../../appliance/nbd/image-source.js';
import {
  COW_HEADER_SIZE,
  ChunkState,
  CowOverlay,
  DATA_FILE,
  MAP_FILE,
  decodeCowHeader,
  encodeCowHeader,
} from '../../appliance/nbd/cow-overlay.js';
import { writableExport } from '../../appliance/nbd/writable-export.js';
import { MemoryChunkStore } from '../../appliance/testing/memory-chunk-store.js';
import { TempDirs, randomChunk, sha256 } from '../../appliance/testing/store-fixtures.js';

const CS = 4096;
const dirs = new TempDirs();
const opened: CowOverlay[] = [];
afterEach(async () => {
  for (const o of opened.splice(0)) await o.close().catch(() => undefined);
  await dirs.cleanup();
});

/** 12 chunks + a 100-byte tail; chunks 1, 4, 5, 9 are ZERO. */
async function image(seed = 0): Promise<{ store: MemoryChunkStore; root: Buffer; vol: Buffer; source: ImageSource }> {
  const size = 12 * CS + 100;
  const vol = Buffer.alloc(size);
  const store = new MemoryChunkStore();
  const w = store.openWriter();
  const b = await ImageIndexBuilder.create({ store, writer: w, volumeSize: size, chunkSize: CS });
  for (let i = 0; i < 13; i++) {
    if ([1, 4, 5, 9].includes(i)) {
      await b.set(i, ZERO_DIGEST);
      continue;
    }
    const plain = randomChunk(Math.min(CS, size - i * CS));
    plain[0] = seed;
    plain.copy(vol, i * CS);
    await w.put(BLOB_CHUNK, sha256(plain), plain);
    await b.set(i, sha256(plain));
  }
  const { rootDigest } = await b.finish();
  await w.flush();
  return { store, root: rootDigest, vol, source: await ImageSource.open(store, rootDigest) };
}

const idOf = (s: ImageSource): { volumeSize: number; chunkSize: number; rootDigest: Buffer } => ({
  volumeSize: s.size,
  chunkSize: s.chunkSize,
  rootDigest: s.rootDigest,
});

async function overlayFor(source: ImageSource, dir?: string): Promise<CowOverlay> {
  const o = await CowOverlay.create(dir ?? join(await dirs.make('blocksnap-cow-'), 'ov'), idOf(source));
  opened.push(o);
  return o;
}

function assemble(segs: Segment[], offset: number, length: number): Buffer {
  const out = Buffer.alloc(length, 0xaa);
  let pos = offset;
  for (const s of segs) {
    expect(s.offset).toBe(pos);
    if ('data' in s) {
      s.data.copy(out, s.offset - offset);
      pos += s.data.length;
    } else {
      out.fill(0, s.offset - offset, s.offset - offset + s.hole);
      pos += s.hole;
    }
  }
  expect(pos).toBe(offset + length);
  return out;
}

describe('CowOverlay layout (frozen)', () => {
  it('header: magic, version, state width, chunk size, size, count, root digest, checksum; 4096 bytes', () => {
    const root = Buffer.alloc(32, 0xab);
    const h = encodeCowHeader({ volumeSize: 3 * 65536 + 1, chunkSize: 65536, rootDigest: root });
    expect(h.length).toBe(COW_HEADER_SIZE);
    expect(h.subarray(0, 64).toString('hex')).toBe(
      '42534e434f570000' + '0100' + '0200' + '00000100' + '0100030000000000' + '0400000000000000' + 'ab'.repeat(32),
    );
    expect(h.subarray(80).equals(Buffer.alloc(COW_HEADER_SIZE - 80))).toBe(true);
    expect(decodeCowHeader(h)).toEqual({ volumeSize: 3 * 65536 + 1, chunkSize: 65536, rootDigest: root });
    const bad = Buffer.from(h);
    bad[20] ^= 1;
    expect(() => decodeCowHeader(bad)).toThrow(expect.objectContaining({ code: 'E_FORMAT' }));
    expect(ChunkState).toEqual({ IMAGE: 0, DATA: 1, ZERO: 2 });
  });

  it('states on disk after flush: 2 bits per chunk at 4096 + i/4; data extent i at i × chunk size', async () => {
    const { source } = await image();
    const o = await overlayFor(source);
    const exp = writableExport(source, o);
    await exp.write!(5 * CS, Buffer.alloc(CS, 7)); // chunk 5 → data
    await exp.zero!(2 * CS, CS, { trim: true }); // chunk 2 → zero
    let map = await readFile(join(o.dir, MAP_FILE));
    expect(map.subarray(COW_HEADER_SIZE).every((b) => b === 0)).toBe(true); // not flushed yet
    await exp.flush!();
    map = await readFile(join(o.dir, MAP_FILE));
    expect(map.length).toBe(COW_HEADER_SIZE + 4); // 13 chunks → 4 bytes
    expect([...map.subarray(COW_HEADER_SIZE)]).toEqual([0b00_10_00_00, 0b00_00_01_00, 0, 0]);
    const data = await readFile(join(o.dir, DATA_FILE));
    expect(data.length).toBe(source.size);
    expect(data.subarray(5 * CS, 6 * CS).equals(Buffer.alloc(CS, 7))).toBe(true);
  });
});

describe('CowOverlay + writableExport', () => {
  it('creating is O(1) in the image size: a 1 TiB overlay is made at once and takes a few KiB', async () => {
    const dir = join(await dirs.make('blocksnap-cow-'), 'big');
    const t = Date.now();
    const o = await CowOverlay.create(dir, { volumeSize: 2 ** 40, chunkSize: 65536, rootDigest: Buffer.alloc(32, 1) });
    opened.push(o);
    expect(Date.now() - t).toBeLessThan(2000);
    expect(await o.allocatedBytes()).toBeLessThan(64 * 1024);
    expect((await stat(join(dir, DATA_FILE))).size).toBe(2 ** 40);
  });

  it('random unaligned writes, zeroes and trims read back like a model; the image source is untouched', async () => {
    const { source, vol } = await image();
    const model = Buffer.from(vol);
    const exp = writableExport(source, await overlayFor(source));
    expect(exp).toMatchObject({ readOnly: false, canMultiConn: true, size: vol.length });
    let seed = 1;
    const rnd = (n: number): number => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed % n;
    };
    for (let k = 0; k < 300; k++) {
      const off = rnd(vol.length);
      const len = 1 + rnd(Math.min(3 * CS, vol.length - off));
      const op = rnd(4);
      if (op < 2) {
        const d = randomBytes(len);
        await exp.write!(off, d);
        d.copy(model, off);
      } else {
        await exp.zero!(off, len, { trim: op === 3 });
        model.fill(0, off, off + len);
      }
      if (k % 10 === 0) {
        const ro = rnd(vol.length);
        const rl = rnd(vol.length - ro);
        expect(assemble(await exp.read(ro, rl), ro, rl).equals(model.subarray(ro, ro + rl)), `after op ${k}`).toBe(true);
      }
    }
    expect(assemble(await exp.read(0, vol.length), 0, vol.length).equals(model)).toBe(true);
    expect(assemble(await source.read(0, vol.length), 0, vol.length).equals(vol)).toBe(true);
  });

  it('concurrent partial writes to one chunk (copy-up from the image) lose nothing', async () => {
    const { source, vol } = await image();
    const exp = writableExport(source, await overlayFor(source));
    const model = Buffer.from(vol);
    const writes = Array.from({ length: 64 }, (_, k) => ({ off: 3 * CS + k * 64, data: randomBytes(64) }));
    // Plus pieces of a ZERO chunk of the image (4) and of a chunk being zeroed meanwhile (7: zeroed first).
    await Promise.all(writes.map((w) => exp.write!(w.off, w.data)));
    for (const w of writes) w.data.copy(model, w.off);
    const zeroThenWrite = [exp.zero!(7 * CS, CS, { trim: false }), exp.write!(7 * CS + 10, Buffer.alloc(10, 9)), exp.write!(4 * CS + 1, Buffer.alloc(3, 8))];
    await Promise.all(zeroThenWrite);
    model.fill(0, 7 * CS, 8 * CS);
    model.fill(9, 7 * CS + 10, 7 * CS + 20);
    model.fill(8, 4 * CS + 1, 4 * CS + 4);
    expect(assemble(await exp.read(0, vol.length), 0, vol.length).equals(model)).toBe(true);
  });

  it('runs: overlaid chunks are data, zeroed chunks holes, untouched chunks as in the image; maxRuns honoured', async () => {
    const { source } = await image();
    const exp = writableExport(source, await overlayFor(source));
    await exp.write!(4 * CS + 100, Buffer.alloc(10, 1)); // ZERO chunk 4 → data
    await exp.zero!(6 * CS, 2 * CS, { trim: true }); // chunks 6, 7 → zero
    const runs = await exp.runs(0, source.size, 100);
    // 0 data, 1 zero, 2-3 data, 4 data (overlay), 5 zero, 6-7 zero (overlay), 8 data, 9 zero, 10-12 data
    expect(runs).toEqual([
      { length: CS, zero: false },
      { length: CS, zero: true },
      { length: 3 * CS, zero: false },
      { length: 3 * CS, zero: true },
      { length: CS, zero: false },
      { length: CS, zero: true },
      { length: 2 * CS + 100, zero: false },
    ]);
    expect(await exp.runs(0, source.size, 1)).toEqual([{ length: CS, zero: false }]);
    const two = await exp.runs(CS, 11 * CS, 2);
    expect(two).toEqual([{ length: CS, zero: true }, { length: 3 * CS, zero: false }]);
  });

  it('an overlay reopened after close shows the writes; space taken ≈ data written', async () => {
    const { source, vol } = await image();
    const dir = join(await dirs.make('blocksnap-cow-'), 'ov');
    const o = await CowOverlay.create(dir, idOf(source));
    const exp = writableExport(source, o);
    const before = await o.allocatedBytes();
    await exp.write!(2 * CS + 5, Buffer.alloc(100, 3)); // copy-up of one chunk
    await exp.write!(8 * CS, Buffer.alloc(2 * CS, 4)); // two whole chunks
    await exp.zero!(10 * CS, CS, { trim: false });
    await o.close();
    const re = await CowOverlay.open(dir, idOf(source));
    opened.push(re);
    expect(await re.allocatedBytes() - before).toBeLessThanOrEqual(3 * CS + 8192);
    const model = Buffer.from(vol);
    model.fill(3, 2 * CS + 5, 2 * CS + 105);
    model.fill(4, 8 * CS, 10 * CS);
    model.fill(0, 10 * CS, 11 * CS);
    expect(assemble(await writableExport(source, re).read(0, vol.length), 0, vol.length).equals(model)).toBe(true);
  });

  it('an overlay of another image is refused (open and writableExport: E_IDENTITY); a damaged map: E_FORMAT', async () => {
    const a = await image(1);
    const b = await image(2);
    const dir = join(await dirs.make('blocksnap-cow-'), 'ov');
    await (await CowOverlay.create(dir, idOf(a.source))).close();
    await expect(CowOverlay.open(dir, idOf(b.source))).rejects.toMatchObject({ code: 'E_IDENTITY' });
    const o = await CowOverlay.open(dir, idOf(a.source));
    opened.push(o);
    expect(() => writableExport(b.source, o)).toThrow(expect.objectContaining({ code: 'E_IDENTITY' }));
    await expect(CowOverlay.create(dir, idOf(a.source))).rejects.toMatchObject({ code: 'E_BUSY' });
    const map = await readFile(join(dir, MAP_FILE));
    map[COW_HEADER_SIZE] = 0b11; // state 3
    await writeFile(join(dir, MAP_FILE), map);
    await expect(CowOverlay.open(dir, idOf(a.source))).rejects.toMatchObject({ code: 'E_FORMAT' });
    await writeFile(join(dir, MAP_FILE), map.subarray(0, COW_HEADER_SIZE + 1));
    await expect(CowOverlay.open(dir, idOf(a.source))).rejects.toMatchObject({ code: 'E_FORMAT' });
  });

  /** Records the overlay's file syncs and map writes, in order. */
  function recordIo(o: CowOverlay): string[] {
    const order: string[] = [];
    const priv = o as unknown as { data: object; map: object };
    const wrap = (obj: object, key: string, label: string): void => {
      const rec = obj as Record<string, (...a: unknown[]) => unknown>;
      const orig = rec[key]!.bind(obj);
      rec[key] = (...a: unknown[]) => {
        order.push(label);
        return orig(...a);
      };
    };
    for (const k of ['sync', 'datasync']) {
      wrap(priv.data, k, `data.${k}`);
      wrap(priv.map, k, `map.${k}`);
    }
    wrap(priv.map, 'write', 'map.write');
    return order;
  }

  it('flush writes the map only after the data is synced (write ordering), and does no more than needed', async () => {
    const { source } = await image();
    const o = await overlayFor(source);
    const order = recordIo(o);
    const exp = writableExport(source, o);
    await exp.write!(0, Buffer.alloc(CS, 1));
    await o.flush();
    expect(order.splice(0)).toEqual(['data.datasync', 'map.write', 'map.datasync']);
    // Nothing written since: nothing to do (PostgreSQL fsyncs files it did not change).
    await o.flush();
    expect(order.splice(0)).toEqual([]);
    // A rewrite of a chunk already in the overlay changes no state: the data alone.
    await exp.write!(100, Buffer.alloc(10, 2));
    await o.flush();
    expect(order.splice(0)).toEqual(['data.datasync']);
    // Zeroing a whole chunk changes a state and writes no data: the map alone.
    await exp.zero!(CS, CS, { trim: true });
    await o.flush();
    expect(order.splice(0)).toEqual(['map.write', 'map.datasync']);
  });

  it('a volatile overlay (the mount manager\'s) never syncs: flush returns at once, close writes the map unsynced, reopening reads it back', async () => {
    const { source } = await image();
    const dir = join(await dirs.make('blocksnap-cow-'), 'ov');
    const o = await CowOverlay.create(dir, idOf(source), { volatile: true });
    const order = recordIo(o);
    const exp = writableExport(source, o);
    await exp.write!(CS + 5, Buffer.alloc(10, 9));
    await o.flush();
    expect(order).toEqual([]);
    expect((await exp.read(CS + 5, 10))[0]).toMatchObject({ data: Buffer.alloc(10, 9) });
    await o.close();
    expect(order).toEqual(['map.write']);
    const again = await CowOverlay.open(dir, idOf(source));
    opened.push(again);
    expect(again.state(1)).toBe(ChunkState.DATA);
    expect(assemble(await writableExport(source, again).read(CS + 5, 10), CS + 5, 10)).toEqual(Buffer.alloc(10, 9));
  });

  it('a TRIM over more chunks than one lock window (3000 chunks) zeroes all of them', async () => {
    const size = 3000 * CS;
    const store = new MemoryChunkStore();
    const w = store.openWriter();
    const b = await ImageIndexBuilder.create({ store, writer: w, volumeSize: size, chunkSize: CS });
    const vol = Buffer.alloc(size);
    for (let i = 0; i < 3000; i++) {
      if (i % 500 !== 7) {
        await b.set(i, ZERO_DIGEST);
        continue;
      }
      const plain = randomChunk(CS);
      plain.copy(vol, i * CS);
      await w.put(BLOB_CHUNK, sha256(plain), plain);
      await b.set(i, sha256(plain));
    }
    const { rootDigest } = await b.finish();
    await w.flush();
    const source = await ImageSource.open(store, rootDigest);
    const exp = writableExport(source, await overlayFor(source));
    await exp.zero!(100, size - 200, { trim: true });
    const model = Buffer.from(vol);
    model.fill(0, 100, size - 100);
    expect(assemble(await exp.read(0, size), 0, size).equals(model)).toBe(true);
    expect(await exp.runs(CS, size - 2 * CS, 10)).toEqual([{ length: size - 2 * CS, zero: true }]);
  });
  it('after a crash (reopened without close) the flushed writes are there and unflushed new chunks read as the image', async () => {
    const { source, vol } = await image();
    const dir = join(await dirs.make('blocksnap-cow-'), 'ov');
    const o = await CowOverlay.create(dir, idOf(source));
    opened.push(o);
    const exp = writableExport(source, o);
    await exp.write!(2 * CS + 1, Buffer.alloc(10, 1));
    await exp.flush!();
    await exp.write!(6 * CS + 1, Buffer.alloc(10, 2)); // never flushed
    // A second open of the files as they are on disk = the state a restart after a crash finds.
    const after = await CowOverlay.open(dir, idOf(source));
    opened.push(after);
    const model = Buffer.from(vol);
    model.fill(1, 2 * CS + 1, 2 * CS + 11);
    expect(after.state(2)).toBe(ChunkState.DATA);
    expect(after.state(6)).toBe(ChunkState.IMAGE);
    expect(assemble(await writableExport(source, after).read(0, vol.length), 0, vol.length).equals(model)).toBe(true);
  });
});
