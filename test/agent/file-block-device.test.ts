import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { FileBlockDevice } from '../../agent/blockdev/file-block-device.js';
import { attachLoop, detachLoop, loopBackingFile } from '../../scripts/lab/loop.js';
import { isBlocksnapError } from '../../proto/errors.js';

let dir: string;
const opened: FileBlockDevice[] = [];
const loops: Array<{ device: string; backingFile: string }> = [];

async function openDev(p: string): Promise<FileBlockDevice> {
  const d = await FileBlockDevice.open(p);
  opened.push(d);
  return d;
}

async function expectDeviceError(p: Promise<unknown>): Promise<void> {
  const e = await p.then(
    () => undefined,
    (err: unknown) => err,
  );
  expect(isBlocksnapError(e, 'E_DEVICE'), `expected E_DEVICE, got ${String(e)}`).toBe(true);
}

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'bsn-fbd-'));
});

afterEach(async () => {
  for (const d of opened.splice(0)) await d.close();
});

afterAll(async () => {
  for (const l of loops.splice(0)) await detachLoop(l.device, { backingFile: l.backingFile });
  await rm(dir, { recursive: true, force: true });
});

describe('FileBlockDevice on a regular file', () => {
  it('reads exactly the bytes at any offset, clipped at the end', async () => {
    const data = randomBytes(3 * 65536 + 1234);
    const file = path.join(dir, 'plain.img');
    await writeFile(file, data);
    const dev = await openDev(file);
    expect(dev.size).toBe(data.length);
    expect(dev.path).toBe(file);
    for (const [off, len] of [
      [0, 65536],
      [65536, 65536],
      [12345, 777],
      [data.length - 100, 65536],
      [0, data.length + 10],
    ] as const) {
      const got = await dev.read(off, len);
      expect(got.length).toBe(Math.min(len, data.length - off));
      expect(got.equals(data.subarray(off, off + len))).toBe(true);
    }
    expect((await dev.read(data.length, 4096)).length).toBe(0);
    expect((await dev.read(100, 0)).length).toBe(0);
    // Concurrent positional reads do not interfere.
    const parts = await Promise.all([0, 1, 2, 3].map((i) => dev.read(i * 65536, 65536)));
    expect(Buffer.concat(parts).equals(data)).toBe(true);
  });

  it('rejects bad ranges, reads after close, and missing files with E_DEVICE', async () => {
    const file = path.join(dir, 'small.img');
    await writeFile(file, randomBytes(8192));
    const dev = await openDev(file);
    await expectDeviceError(dev.read(-1, 10));
    await expectDeviceError(dev.read(8193, 10));
    await expectDeviceError(dev.read(1.5, 10));
    await expectDeviceError(dev.read(0, -1));
    await dev.close();
    await dev.close();
    await expectDeviceError(dev.read(0, 10));
    await expectDeviceError(FileBlockDevice.open(path.join(dir, 'missing.img')));
    await expectDeviceError(FileBlockDevice.open(dir));
  });

  it('fails with E_DEVICE instead of returning short data when the file shrinks under it', async () => {
    const file = path.join(dir, 'shrinking.img');
    await writeFile(file, randomBytes(4 * 65536));
    const dev = await openDev(file);
    await truncate(file, 65536 + 100);
    expect((await dev.read(0, 65536)).length).toBe(65536);
    await expectDeviceError(dev.read(65536, 65536));
  });

  it('assembles a read larger than one read(2) call from several partial reads', async () => {
    const data = randomBytes(1024 * 1024 + 999);
    const file = path.join(dir, 'pieces.img');
    await writeFile(file, data);
    const dev = await FileBlockDevice.open(file, { maxReadPerCall: 4096 });
    opened.push(dev);
    expect((await dev.read(0, data.length)).equals(data)).toBe(true);
    expect((await dev.read(4095, 3 * 4096 + 2)).equals(data.subarray(4095, 4095 + 3 * 4096 + 2))).toBe(true);
    await expectDeviceError(FileBlockDevice.open(file, { maxReadPerCall: 0 }));
    await expectDeviceError(FileBlockDevice.open(file, { maxReadPerCall: 2 ** 31 }));
  });
});

describe('FileBlockDevice on a loop device', () => {
  it('gets the size from the kernel and reads what the backing file holds', async () => {
    const data = randomBytes(4 * 1024 * 1024 + 3 * 512);
    const file = path.join(dir, 'loop-backed.img');
    await writeFile(file, data);
    for (const directIo of [false, true]) {
      const device = await attachLoop(file, { directIo });
      loops.push({ device, backingFile: file });
      expect(await loopBackingFile(device)).toBe(file);
      const dev = await openDev(device);
      // A block device's stat size is 0: this size came from sysfs.
      expect(dev.size).toBe(data.length);
      expect((await dev.read(0, dev.size)).equals(data)).toBe(true);
      expect((await dev.read(512 * 7, 4096)).equals(data.subarray(512 * 7, 512 * 7 + 4096))).toBe(true);
      await dev.close();
      expect(await detachLoop(device, { backingFile: file })).toBe('detached');
      loops.pop();
    }
  });
});
