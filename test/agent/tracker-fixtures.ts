/**
 * Real block devices for the tracker tests: a sparse file on a loop device
 * (buffered, 512-byte logical sectors so dd can write single sectors),
 * recorded in a test ledger before it exists so the cleanup command can
 * release what a killed run left.
 */
import { mkdtemp, open, readdir, realpath } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execa } from 'execa';
import { releaseResources } from '../../scripts/lab/cleanup.js';
import { Ledger } from '../../scripts/lab/ledger.js';
import { attachLoop, loopBackingFile } from '../../scripts/lab/loop.js';
import { parseInstanceName, removeInstance, tracefsRoot } from '../../agent/cbt/tracefs/tracefs-instance.js';

export interface LoopRig {
  dir: string;
  image: string;
  device: string;
  ledger: Ledger;
  release(): Promise<void>;
}

export async function createLoopRig(size: number, opts: { mbr?: { start: number; sectors: number } } = {}): Promise<LoopRig> {
  const ledger = await Ledger.create('tracker-test');
  const dir = await realpath(await mkdtemp(path.join(os.tmpdir(), 'blocksnap-tracker-')));
  await ledger.add({ kind: 'dir', path: dir });
  let partitioned: { device: string; image: string } | null = null;
  const release = async () => {
    // Partitions added with partx outlive the detach: delete them first, on our device only.
    if (partitioned && (await loopBackingFile(partitioned.device)) === partitioned.image) {
      await execa('partx', ['-d', partitioned.device], { reject: false, stdin: 'ignore' });
    }
    const actions = await releaseResources(ledger.path, ledger.resources);
    const bad = actions.filter((a) => a.outcome === 'failed' || a.outcome === 'skipped');
    if (bad.length > 0) throw new Error(`cannot release: ${JSON.stringify(bad)}`);
    await ledger.delete();
  };
  try {
    const image = path.join(dir, 'disk.img');
    const fh = await open(image, 'wx', 0o600);
    try {
      await fh.truncate(size);
      if (opts.mbr) await fh.write(mbrWithOnePartition(opts.mbr.start, opts.mbr.sectors), 0, 512, 0);
    } finally {
      await fh.close();
    }
    const idx = await ledger.add({ kind: 'loop', backingFile: image, device: null });
    const device = await attachLoop(image);
    await ledger.update(idx, { device });
    if (opts.mbr) {
      partitioned = { device, image };
      // This kernel has no partition-table parsers: partx adds the partition through BLKPG.
      await execa('partx', ['-a', device], { stdin: 'ignore' });
    }
    return { dir, image, device, ledger, release };
  } catch (e) {
    await release().catch(() => {});
    throw e;
  }
}

/** A classic MBR with one Linux partition (LBA only). */
function mbrWithOnePartition(start: number, sectors: number): Buffer {
  const b = Buffer.alloc(512);
  const e = 446;
  b[e + 4] = 0x83;
  b.writeUInt32LE(start, e + 8);
  b.writeUInt32LE(sectors, e + 12);
  b[510] = 0x55;
  b[511] = 0xaa;
  return b;
}

/** O_DIRECT write of random bytes; offset and length in multiples of 512. */
export async function ddWrite(device: string, offset: number, length: number): Promise<void> {
  if (offset % 512 !== 0 || length % 512 !== 0) throw new Error(`unaligned write ${offset}+${length}`);
  await execa('dd', [
    'if=/dev/urandom',
    `of=${device}`,
    'bs=512',
    `seek=${offset / 512}`,
    `count=${length / 512}`,
    'oflag=direct',
    'conv=notrunc',
    'status=none',
  ]);
}

export async function ddRead(device: string, offset: number, length: number): Promise<void> {
  await execa('dd', [`if=${device}`, 'of=/dev/null', 'bs=512', `skip=${offset / 512}`, `count=${length / 512}`, 'iflag=direct', 'status=none']);
}

export async function blkdiscard(device: string, offset: number, length: number, zeroOut = false): Promise<void> {
  await execa('blkdiscard', [...(zeroOut ? ['-z'] : []), '-o', String(offset), '-l', String(length), device]);
}

/** Instances this test process owns (should be none between tests). */
export async function ownInstances(): Promise<string[]> {
  const root = await tracefsRoot();
  const names = await readdir(path.join(root, 'instances'));
  return names.filter((n) => parseInstanceName(n)?.pid === process.pid);
}

/** Removes instances this process left (a failed test), returning their names. */
export async function removeOwnInstances(): Promise<string[]> {
  const root = await tracefsRoot();
  const left = await ownInstances();
  for (const n of left) await removeInstance(root, n);
  return left;
}
