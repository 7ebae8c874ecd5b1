import { promises as fsp } from 'node:fs';
import { BlocksnapError } from '../../proto/errors.js';
import type { DeviceIdentity, IoCounters } from './tracker.js';

/**
 * Identity, geometry and I/O counters of a block device from sysfs
 * (/sys/dev/block/MAJ:MIN/...). The tracer needs the *disk* a partition
 * belongs to: block tracepoints report the whole disk's dev_t and sectors
 * already remapped to the disk (blk_partition_remap runs before
 * block_bio_queue fires).
 */
export interface BlockDeviceInfo {
  identity: DeviceIdentity;
  /** dev_t of the disk the tracepoints report (the device itself unless a partition). */
  traceMajor: number;
  traceMinor: number;
  /** First sector of the device on that disk (0 unless a partition). */
  startSector: number;
}

export async function readBlockDeviceInfo(devicePath: string): Promise<BlockDeviceInfo> {
  let st;
  try {
    st = await fsp.stat(devicePath, { bigint: true });
  } catch (e) {
    throw new BlocksnapError('E_DEVICE', `cannot stat ${devicePath}: ${(e as Error).message}`, { cause: e });
  }
  if (!st.isBlockDevice()) throw new BlocksnapError('E_DEVICE', `${devicePath} is not a block device`);
  const { major, minor } = splitDev(st.rdev);
  const sys = sysDir(major, minor);
  const sectors = await readNumber(`${sys}/size`);
  const size = sectors * 512;
  if (size <= 0) throw new BlocksnapError('E_DEVICE', `${devicePath} has size 0 (not attached?)`);
  let traceMajor = major;
  let traceMinor = minor;
  let startSector = 0;
  const isPartition = await exists(`${sys}/partition`);
  if (isPartition) {
    startSector = await readNumber(`${sys}/start`);
    const [pmaj, pmin] = (await fsp.readFile(`${sys}/../dev`, 'utf8')).trim().split(':').map(Number);
    traceMajor = pmaj!;
    traceMinor = pmin!;
  }
  const diskseqFile = isPartition ? `${sys}/../diskseq` : `${sys}/diskseq`;
  const diskseq = (await exists(diskseqFile)) ? await readNumber(diskseqFile) : 0;
  return { identity: { major, minor, size, diskseq }, traceMajor, traceMinor, startSector };
}

/**
 * Completed write and discard I/Os of the device (Documentation/block/stat.rst:
 * fields 5,7 writes, 12,14 discards) and writes in flight (`inflight`).
 * Write-zeroes are accounted as writes.
 */
export async function readIoCounters(major: number, minor: number): Promise<IoCounters> {
  const sys = sysDir(major, minor);
  const f = (await fsp.readFile(`${sys}/stat`, 'utf8')).trim().split(/\s+/).map(Number);
  const inflight = (await fsp.readFile(`${sys}/inflight`, 'utf8')).trim().split(/\s+/).map(Number);
  const iostatsFile = (await exists(`${sys}/queue/iostats`)) ? `${sys}/queue/iostats` : `${sys}/../queue/iostats`;
  const available = (await exists(iostatsFile)) ? (await readNumber(iostatsFile)) === 1 : true;
  return {
    writeIos: f[4] ?? 0,
    writeSectors: f[6] ?? 0,
    discardIos: f[11] ?? 0,
    discardSectors: f[13] ?? 0,
    writesInFlight: inflight[1] ?? 0,
    available: available && f.length >= 15,
  };
}

/** Linux dev_t encoding as glibc's major()/minor() decode it. */
export function splitDev(rdev: bigint): { major: number; minor: number } {
  const major = Number(((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & 0xfffff000n));
  const minor = Number((rdev & 0xffn) | ((rdev >> 12n) & 0xffffff00n));
  return { major, minor };
}

/** The kernel's in-trace dev_t (MKDEV with MINORBITS = 20), used by event filters. */
export function kernelDev(major: number, minor: number): number {
  return major * 2 ** 20 + minor;
}

function sysDir(major: number, minor: number): string {
  return `/sys/dev/block/${major}:${minor}`;
}

async function readNumber(file: string): Promise<number> {
  const n = Number((await fsp.readFile(file, 'utf8')).trim());
  if (!Number.isFinite(n)) throw new BlocksnapError('E_DEVICE', `unexpected content in ${file}`);
  return n;
}

async function exists(file: string): Promise<boolean> {
  try {
    await fsp.access(file);
    return true;
  } catch {
    return false;
  }
}
