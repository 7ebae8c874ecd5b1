import { createHash } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  decodeBitmapFile,
  encodeBitmapFile,
  readBitmapFile,
  writeBitmapFile,
  type BitmapFileContent,
} from '../../agent/cbt/bitmap-file.js';
import { ChangeBitmap } from '../../agent/cbt/change-bitmap.js';

function sample(): BitmapFileContent {
  const bitmap = new ChangeBitmap(40 * 65536, 65536); // 40 chunks → 2 words
  bitmap.setChunk(0);
  bitmap.setChunk(9);
  bitmap.setChunk(39);
  return {
    identity: { major: 7, minor: 3, size: 40 * 65536, diskseq: 58 },
    chunkSize: 65536,
    generation: 5,
    clean: true,
    invalidReason: null,
    counters: { writeIos: 4283, writeSectors: 388200, discardIos: 7, discardSectors: 917656 },
    savedAt: new Date(1_700_000_000_123),
    bitmap,
  };
}

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});
function tempDir(): string {
  const d = mkdtempSync(path.join(tmpdir(), 'blocksnap-bitmapfile-'));
  dirs.push(d);
  return d;
}

describe('bitmap file', () => {
  it('pins the layout byte by byte', () => {
    const bytes = encodeBitmapFile(sample());
    const hex = (from: number, to: number) => bytes.subarray(from, to).toString('hex');
    expect(bytes.length).toBe(256 + 8);
    expect(hex(0, 8)).toBe('42534e424d415000'); // "BSNBMAP\0"
    expect(hex(8, 10)).toBe('0100'); // version 1
    expect(hex(10, 12)).toBe('0500'); // clean | counters valid
    expect(hex(12, 16)).toBe('00000100'); // chunk size 65536
    expect(hex(16, 20)).toBe('07000000'); // major
    expect(hex(20, 24)).toBe('03000000'); // minor
    expect(hex(24, 32)).toBe('0000280000000000'); // size 2621440
    expect(hex(32, 40)).toBe('3a00000000000000'); // diskseq 58
    expect(hex(40, 48)).toBe('0500000000000000'); // generation
    expect(hex(48, 56)).toBe('2800000000000000'); // 40 chunks
    expect(hex(56, 64)).toBe('bb10000000000000'); // 4283 write I/Os
    expect(hex(64, 72)).toBe('68ec050000000000'); // 388200 sectors
    expect(hex(72, 80)).toBe('0700000000000000'); // 7 discard I/Os
    expect(hex(80, 88)).toBe('98000e0000000000'); // 917656 sectors
    expect(hex(88, 96)).toBe('7b68e5cf8b010000'); // 1700000000123 ms
    expect(hex(96, 224)).toBe('00'.repeat(128)); // no reason
    const sum = createHash('sha256').update(bytes.subarray(0, 224)).update(bytes.subarray(256)).digest('hex');
    expect(hex(224, 256)).toBe(sum);
    expect(hex(256, 264)).toBe('01020000' + '80000000'); // chunks 0, 9 | chunk 39
  });

  it('round-trips, including an invalid reason cut at a character boundary', () => {
    const c = sample();
    expect(decodeBitmapFile(encodeBitmapFile(c))).toEqual(c);
    const long = 'é'.repeat(100); // 200 bytes of UTF-8
    const d = { ...sample(), clean: false, invalidReason: long, counters: null };
    const back = decodeBitmapFile(encodeBitmapFile(d));
    expect(back.clean).toBe(false);
    expect(back.counters).toBeNull();
    expect(back.invalidReason).toBe('é'.repeat(64));
    expect(back.bitmap.equals(d.bitmap)).toBe(true);
  });

  it('rejects every kind of damage with a precise reason', () => {
    const good = encodeBitmapFile(sample());
    const damaged = (f: (b: Buffer) => void) => {
      const b = Buffer.from(good);
      f(b);
      return () => decodeBitmapFile(b);
    };
    expect(damaged((b) => (b[0] = 0x41))).toThrow(/bad magic/);
    expect(damaged((b) => b.writeUInt16LE(2, 8))).toThrow(/unsupported version 2/);
    expect(damaged((b) => (b[257] = b[257]! ^ 1))).toThrow(/checksum mismatch/);
    expect(damaged((b) => (b[10] = 0))).toThrow(/checksum mismatch/); // flags are covered too
    expect(damaged((b) => b.writeBigUInt64LE(41n, 48))).toThrow(/inconsistent geometry/);
    expect(() => decodeBitmapFile(good.subarray(0, 100))).toThrow(/shorter than the header/);
    expect(() => decodeBitmapFile(good.subarray(0, 260))).toThrow(/expected 8/);
  });

  it('writes durably through a temp file and leaves nothing else behind', async () => {
    const dir = tempDir();
    const file = path.join(dir, 'vol.cbt');
    expect(await readBitmapFile(file)).toBeNull();
    await writeBitmapFile(file, sample());
    const second = { ...sample(), generation: 6 };
    await writeBitmapFile(file, second);
    expect(readdirSync(dir)).toEqual(['vol.cbt']);
    expect((await readBitmapFile(file))!.generation).toBe(6);
    writeFileSync(file, readFileSync(file).subarray(0, 50));
    await expect(readBitmapFile(file)).rejects.toThrow(/shorter than the header/);
  });
});
