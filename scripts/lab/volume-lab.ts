/**
 * A real file-backed volume for tests, built as LAB.md describes:
 *
 *   ROOT/pool.img  sparse → loop → mkfs.xfs -m reflink=1 → mounted at ROOT/pool
 *   ROOT/pool/<name>.img  sparse → loop (direct I/O) → mkfs.ext4 → ROOT/vol (noatime)
 *
 * Snapshots of the volume are reflink clones inside the pool. Every resource
 * is recorded in a ledger before (or right after) it exists; `destroy()`
 * releases exactly those, in reverse order, and is safe to call at any time,
 * repeatedly, and after a partial creation.
 */
import { chmod, mkdir, mkdtemp, open, realpath } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execa } from 'execa';
import { BlocksnapError } from '../../proto/errors.js';
import type { VolumeSpec } from '../../agent/snapshot/snapshot-provider.js';
import { releaseResources, type CleanupAction } from './cleanup.js';
import { Ledger } from './ledger.js';
import { attachLoop } from './loop.js';

const MiB = 1024 * 1024;

export interface VolumeLabOptions {
  /** Directory to build in; created if missing. Default: a fresh temp dir. */
  root?: string;
  /** Sparse size of the XFS pool (mkfs.xfs wants ≥ 300 MiB). Default 1 GiB. */
  poolSize?: number;
  /** Sparse size of the volume image. Default 256 MiB. */
  volumeSize?: number;
  fs?: 'ext4';
  /** Volume name (also the image file name). Default 'vol'. */
  name?: string;
  /** Direct I/O on the volume's loop device. Default true (LAB.md). */
  directIo?: boolean;
  chunkSize?: number;
  /** Where the ledger goes (tests of the cleanup use a private one). */
  ledgerDir?: string;
}

export interface VolumeLab {
  root: string;
  poolImage: string;
  poolDevice: string;
  poolMount: string;
  volumeImage: string;
  volumeDevice: string;
  volumeMount: string;
  /** Ready for a SnapshotProvider. */
  volume: VolumeSpec;
  ledgerPath: string;
  /** Releases everything the lab created; throws E_DEVICE if something could not be released. */
  destroy(): Promise<CleanupAction[]>;
}

async function run(cmd: string, args: string[]): Promise<void> {
  const r = await execa(cmd, args, { reject: false, stdin: 'ignore', timeout: 120_000 });
  if (r.exitCode !== 0) {
    throw new BlocksnapError('E_DEVICE', `${cmd} ${args.join(' ')} failed: ${String(r.stderr || r.stdout || r.shortMessage).trim()}`, { cause: r });
  }
}

async function sparseFile(file: string, size: number): Promise<string> {
  const fh = await open(file, 'wx', 0o600);
  try {
    await fh.truncate(size);
  } finally {
    await fh.close();
  }
  // The kernel reports a loop's backing file by its real path.
  return realpath(file);
}

export async function createVolumeLab(opts: VolumeLabOptions = {}): Promise<VolumeLab> {
  if ((opts.fs ?? 'ext4') !== 'ext4') throw new BlocksnapError('E_CONFIG', `unsupported lab filesystem ${String(opts.fs)}`);
  const name = opts.name ?? 'vol';
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]*$/.test(name)) throw new BlocksnapError('E_CONFIG', `invalid volume name ${name}`);
  const ledger = await Ledger.create('volume-lab', opts.ledgerDir);
  let root: string;
  if (opts.root) {
    root = path.resolve(opts.root);
    await mkdir(root, { recursive: true });
  } else {
    root = await mkdtemp(path.join(os.tmpdir(), 'blocksnap-lab-'));
  }
  root = await realpath(root);
  // Only a root we made is ours to delete.
  if (!opts.root) await ledger.add({ kind: 'dir', path: root });

  let destroyed: Promise<CleanupAction[]> | undefined;
  const destroy = async (): Promise<CleanupAction[]> => {
    const actions = await releaseResources(ledger.path, ledger.resources);
    const failed = actions.filter((a) => a.outcome === 'failed' || a.outcome === 'skipped');
    if (failed.length) {
      destroyed = undefined; // let a later call retry what is left
      throw new BlocksnapError('E_DEVICE', `volume lab ${root}: cannot release ${failed.map((a) => `${a.kind} ${a.target}: ${a.detail}`).join('; ')}`);
    }
    await ledger.delete();
    return actions;
  };
  const destroyOnce = () => (destroyed ??= destroy());

  try {
    // postgres (initdb runs as that user) must be able to traverse to the volume.
    await chmod(root, 0o755);
    const poolImage = await sparseFile(path.join(root, 'pool.img'), opts.poolSize ?? 1024 * MiB);
    const poolLoop = await ledger.add({ kind: 'loop', backingFile: poolImage, device: null });
    const poolDevice = await attachLoop(poolImage);
    await ledger.update(poolLoop, { device: poolDevice });
    await run('mkfs.xfs', ['-q', '-f', '-m', 'reflink=1', poolDevice]);
    const poolMount = path.join(root, 'pool');
    await mkdir(poolMount);
    await ledger.add({ kind: 'mount', target: poolMount, source: poolDevice, fstype: 'xfs' });
    await run('mount', ['-t', 'xfs', '-o', 'noatime', poolDevice, poolMount]);
    await chmod(poolMount, 0o755);

    const volumeImage = await sparseFile(path.join(poolMount, `${name}.img`), opts.volumeSize ?? 256 * MiB);
    const volLoop = await ledger.add({ kind: 'loop', backingFile: volumeImage, device: null });
    const volumeDevice = await attachLoop(volumeImage, { directIo: opts.directIo ?? true });
    await ledger.update(volLoop, { device: volumeDevice });
    // Eager inode-table/journal init, or background init shows up as changed blocks.
    await run('mkfs.ext4', ['-q', '-F', '-b', '4096', '-E', 'lazy_itable_init=0,lazy_journal_init=0', volumeDevice]);
    const volumeMount = path.join(root, 'vol');
    await mkdir(volumeMount);
    await ledger.add({ kind: 'mount', target: volumeMount, source: volumeDevice, fstype: 'ext4' });
    await run('mount', ['-t', 'ext4', '-o', 'noatime', volumeDevice, volumeMount]);
    await chmod(volumeMount, 0o755);

    return {
      root,
      poolImage,
      poolDevice,
      poolMount,
      volumeImage,
      volumeDevice,
      volumeMount,
      volume: { name, device: volumeDevice, image: volumeImage, mountpoint: volumeMount, chunkSize: opts.chunkSize ?? 64 * 1024 },
      ledgerPath: ledger.path,
      destroy: destroyOnce,
    };
  } catch (e) {
    await destroyOnce().catch((cleanupError: unknown) => {
      throw new BlocksnapError('E_DEVICE', `volume lab creation failed and its cleanup too`, { cause: new AggregateError([e, cleanupError]) });
    });
    throw e instanceof BlocksnapError ? e : new BlocksnapError('E_DEVICE', `cannot create volume lab in ${root}`, { cause: e });
  }
}
