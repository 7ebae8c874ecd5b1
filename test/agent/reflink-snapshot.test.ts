import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import { copyFile, mkdtemp, open, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import { pino } from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { FileBlockDevice } from '../../agent/blockdev/file-block-device.js';
import { freezeFilesystem, thawFilesystem } from '../../agent/snapshot/fsfreeze.js';
import { ReflinkSnapshotProvider, snapshotDirOf } from '../../agent/snapshot/reflink-snapshot-provider.js';
import { readVolumeRegistry, writeVolumeRegistry } from '../../agent/snapshot/reflink-state.js';
import { freezeMarkerPath, writeFreezeMarker } from '../../agent/snapshot/freeze-marker.js';
import type { VolumeSpec } from '../../agent/snapshot/snapshot-provider.js';
import { startWriteProbe, writeOutcome } from '../support/write-probe.js';
import { createVolumeLab, type VolumeLab } from '../../scripts/lab/volume-lab.js';
import { isBlocksnapError } from '../../proto/errors.js';

const MiB = 1024 * 1024;
const logger = pino({ level: 'silent' });
let lab: VolumeLab;
let tmp: string;
let stateDir: string;
let probeSeq = 0;

/** Starts a write to the volume in a child process; resolves true when it completed. */
function startWrite(dir: string): Promise<boolean> {
  const child = spawn('sh', ['-c', 'printf probe > "$1"', 'sh', path.join(dir, `probe-${probeSeq++}`)], { stdio: 'ignore' });
  return new Promise((resolve) => child.on('exit', (code) => resolve(code === 0)));
}

/** True if a write to `dir` completes within `ms` (false while its filesystem is frozen). */
async function writesWithin(dir: string, ms: number): Promise<boolean> {
  const done = startWrite(dir);
  return Promise.race([done, new Promise<boolean>((r) => setTimeout(() => r(false), ms))]);
}

async function writeSynced(file: string, data: Buffer): Promise<void> {
  const fh = await open(file, 'w');
  await fh.writeFile(data);
  await fh.sync();
  await fh.close();
}

async function readAll(p: string): Promise<Buffer> {
  const dev = await FileBlockDevice.open(p);
  try {
    const parts: Buffer[] = [];
    for (let off = 0; off < dev.size; off += 4 * MiB) parts.push(await dev.read(off, 4 * MiB));
    return Buffer.concat(parts);
  } finally {
    await dev.close();
  }
}

async function rejection(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => {
      throw new Error('expected a rejection');
    },
    (e: unknown) => e,
  );
}

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'bsn-reflink-'));
  stateDir = path.join(tmp, 'state');
  lab = await createVolumeLab({ poolSize: 512 * MiB, volumeSize: 64 * MiB, ledgerDir: path.join(tmp, 'ledgers') });
});

afterEach(async () => {
  // A failed assertion must never leave the shared machine with a frozen filesystem.
  if (lab) await thawFilesystem(lab.volumeMount, { ignoreNotFrozen: true });
});

afterAll(async () => {
  await lab?.destroy();
  await rm(tmp, { recursive: true, force: true });
});

describe('state files', () => {
  it('pins the freeze marker and volume registry layouts', async () => {
    const dir = path.join(tmp, 'pin');
    const file = await writeFreezeMarker(dir, {
      volume: 'pgdata',
      mountpoint: '/srv/pg',
      device: '/dev/loop9',
      snapshotTemp: '/pool/.blocksnap/.pgdata@t1.snap.tmp',
      pid: 42,
      createdAt: '2024-01-02T03:04:05.000Z',
    });
    expect(file).toBe(path.join(dir, 'freeze-pgdata.json'));
    expect(await readFile(file, 'utf8')).toBe(
      '{\n  "format": "blocksnap-freeze-marker",\n  "version": 1,\n  "volume": "pgdata",\n  "mountpoint": "/srv/pg",\n' +
        '  "device": "/dev/loop9",\n  "snapshotTemp": "/pool/.blocksnap/.pgdata@t1.snap.tmp",\n  "pid": 42,\n' +
        '  "createdAt": "2024-01-02T03:04:05.000Z"\n}\n',
    );
    await writeVolumeRegistry(dir, new Map([['b', '/p2/.blocksnap'], ['a', '/p1/.blocksnap']]));
    expect(await readFile(path.join(dir, 'reflink-volumes.json'), 'utf8')).toBe(
      '{\n  "format": "blocksnap-reflink-volumes",\n  "version": 1,\n  "volumes": {\n    "a": "/p1/.blocksnap",\n    "b": "/p2/.blocksnap"\n  }\n}\n',
    );
    expect([...(await readVolumeRegistry(dir))]).toEqual([['a', '/p1/.blocksnap'], ['b', '/p2/.blocksnap']]);
    expect(await readdir(dir)).toEqual(['freeze-pgdata.json', 'reflink-volumes.json']);
  });
});

describe('ReflinkSnapshotProvider on a real XFS pool', () => {
  it('takes a point-in-time snapshot identical to a copy made inside the freeze', async () => {
    const provider = new ReflinkSnapshotProvider({ stateDir, logger });
    const before = randomBytes(MiB);
    const after = randomBytes(MiB);
    const dataFile = path.join(lab.volumeMount, 'data.bin');
    await writeSynced(dataFile, before);

    let frozenCopy: Buffer | undefined;
    let blockedWrite: Promise<boolean> | undefined;
    let markerWhileFrozen: unknown;
    let stillBlocked = false;
    const snap = await provider.create(lab.volume, 'pit', {
      whileFrozen: async () => {
        markerWhileFrozen = JSON.parse(await readFile(freezeMarkerPath(stateDir, lab.volume.name), 'utf8'));
        const probe = startWriteProbe(path.join(lab.volumeMount, `probe-${probeSeq++}`));
        blockedWrite = probe.done;
        stillBlocked = (await writeOutcome(probe)) === 'blocked';
        frozenCopy = await readFile(lab.volumeImage);
      },
    });
    expect(markerWhileFrozen).toMatchObject({ format: 'blocksnap-freeze-marker', volume: 'vol', mountpoint: lab.volumeMount });
    // The write started inside the window went through only after the thaw.
    expect(stillBlocked).toBe(true);
    expect(await blockedWrite).toBe(true);
    await expect(stat(freezeMarkerPath(stateDir, 'vol'))).rejects.toThrow();
    expect(snap.id).toBe('vol@pit');
    expect(snap.path).toBe(path.join(lab.poolMount, '.blocksnap', 'vol@pit.snap'));
    expect(snap.freezeSeconds).toBeGreaterThan(0);
    expect(snap.snapshotSeconds).toBeGreaterThanOrEqual(snap.freezeSeconds);

    await writeSynced(dataFile, after);
    const snapBytes = await readAll(snap.path);
    const live = await readAll(lab.volumeImage);
    expect(snapBytes.length).toBe(64 * MiB);
    expect(snapBytes.equals(frozenCopy!)).toBe(true);
    // ext4 blocks are 4 KiB aligned in the image: whole blocks of the file are findable.
    expect(snapBytes.indexOf(before.subarray(0, 4096))).toBeGreaterThanOrEqual(0);
    expect(snapBytes.indexOf(after.subarray(0, 4096))).toBe(-1);
    expect(live.indexOf(after.subarray(0, 4096))).toBeGreaterThanOrEqual(0);
    expect(live.equals(snapBytes)).toBe(false);

    expect((await provider.list()).map((s) => s.id)).toContain('vol@pit');
    await provider.remove(snap);
    await provider.remove(snap);
    expect((await provider.list()).map((s) => s.id)).not.toContain('vol@pit');
    await expect(stat(snap.path)).rejects.toThrow();
  });

  it('refuses a second snapshot of the same volume while one is being taken, and a duplicate tag', async () => {
    const provider = new ReflinkSnapshotProvider({ stateDir, logger });
    let second: unknown;
    const first = await provider.create(lab.volume, 'busy', {
      whileFrozen: async () => {
        second = await rejection(provider.create(lab.volume, 'busy2'));
      },
    });
    expect(isBlocksnapError(second, 'E_BUSY')).toBe(true);
    expect(isBlocksnapError(await rejection(provider.create(lab.volume, 'busy')), 'E_SNAPSHOT')).toBe(true);
    expect(await writesWithin(lab.volumeMount, 5000)).toBe(true);
    await provider.remove(first);
  });

  it('thaws and leaves nothing behind when the clone fails inside the freeze window', async () => {
    // An image on the host's ext4 root cannot be reflinked: FICLONE fails while frozen.
    const otherDir = path.join(tmp, 'not-reflink');
    await rm(otherDir, { recursive: true, force: true });
    await execa('mkdir', ['-p', otherDir]);
    const image = path.join(otherDir, 'plain.img');
    await writeFile(image, randomBytes(MiB));
    const spec: VolumeSpec = { ...lab.volume, name: 'noreflink', image };
    const provider = new ReflinkSnapshotProvider({ stateDir, logger });
    let frozen = false;
    const err = await rejection(
      provider.create(spec, 't1', {
        whileFrozen: async () => {
          frozen = (await writeOutcome(startWriteProbe(path.join(lab.volumeMount, `probe-${probeSeq++}`)))) === 'blocked';
        },
      }),
    );
    expect(frozen).toBe(true);
    expect(isBlocksnapError(err, 'E_SNAPSHOT')).toBe(true);
    expect(await writesWithin(lab.volumeMount, 5000)).toBe(true);
    expect(await readdir(snapshotDirOf(image))).toEqual([]);
    await expect(stat(freezeMarkerPath(stateDir, 'noreflink'))).rejects.toThrow();
  });

  it('thaws when the hook inside the window throws, and never freezes for a missing image or a non-mount', async () => {
    const provider = new ReflinkSnapshotProvider({ stateDir, logger });
    const err = await rejection(
      provider.create(lab.volume, 'hookfail', {
        whileFrozen: async () => {
          throw new Error('tracker cut failed');
        },
      }),
    );
    expect(isBlocksnapError(err, 'E_SNAPSHOT')).toBe(true);
    expect(await writesWithin(lab.volumeMount, 5000)).toBe(true);
    expect((await readdir(path.join(lab.poolMount, '.blocksnap'))).filter((n) => n.includes('hookfail'))).toEqual([]);

    let hookRan = false;
    const whileFrozen = async () => {
      hookRan = true;
    };
    const missing = { ...lab.volume, image: path.join(lab.poolMount, 'missing.img') };
    expect(isBlocksnapError(await rejection(provider.create(missing, 'm1', { whileFrozen })), 'E_SNAPSHOT')).toBe(true);
    // A plain directory on the host root: freezing it would freeze `/`.
    const notMounted = { ...lab.volume, mountpoint: tmp };
    expect(isBlocksnapError(await rejection(provider.create(notMounted, 'm2', { whileFrozen })), 'E_CONFIG')).toBe(true);
    expect(hookRan).toBe(false);
    expect(await writesWithin(lab.volumeMount, 5000)).toBe(true);
    expect(await readdir(stateDir)).toEqual(['reflink-volumes.json']);
  });

  it('after a kill -9 inside the freeze window, a new provider thaws and drops stale snapshots', async () => {
    const first = new ReflinkSnapshotProvider({ stateDir, logger });
    await first.create(lab.volume, 'keep1');
    await first.create(lab.volume, 'drop1');
    // What the killed process left: a half-made clone, a marker, a frozen filesystem.
    const snapDir = path.join(lab.poolMount, '.blocksnap');
    const leftoverTmp = path.join(snapDir, '.vol@crash.snap.tmp');
    await copyFile(lab.volumeImage, leftoverTmp, constants.COPYFILE_FICLONE_FORCE);
    await writeFile(
      path.join(stateDir, 'freeze-vol.json'),
      JSON.stringify({ format: 'blocksnap-freeze-marker', version: 1, volume: 'vol', mountpoint: lab.volumeMount, snapshotTemp: leftoverTmp }),
    );
    await freezeFilesystem(lab.volumeMount);
    expect(await writesWithin(lab.volumeMount, 200)).toBe(false);

    // No volumes configured: the state directory alone must lead to them.
    const next = new ReflinkSnapshotProvider({ stateDir, logger });
    const released = await next.cleanupStale(new Set(['vol@keep1']));
    expect(released).toEqual(expect.arrayContaining([`thawed:${lab.volumeMount}`, 'marker:vol', 'snapshot:vol@drop1']));
    expect(await writesWithin(lab.volumeMount, 5000)).toBe(true);
    expect((await readdir(snapDir)).sort()).toEqual(['vol@keep1.snap']);
    await expect(stat(path.join(stateDir, 'freeze-vol.json'))).rejects.toThrow();
    expect(await next.cleanupStale(new Set(['vol@keep1']))).toEqual([]);

    // A provider configured with the volume finds it without any registry.
    const configured = new ReflinkSnapshotProvider({ stateDir: path.join(tmp, 'fresh-state'), logger, volumes: [lab.volume] });
    expect((await configured.list()).map((s) => s.id)).toEqual(['vol@keep1']);

    // The cleanup command releases the rest from the state directory alone.
    const cli = await execa('npx', ['tsx', 'scripts/cleanup.ts', '--state-dir', stateDir, '--ledger-dir', path.join(tmp, 'no-ledgers'), '--json'], {
      reject: false,
      cwd: fileURLToPath(new URL('../..', import.meta.url)),
    });
    expect(cli.exitCode, String(cli.stderr)).toBe(0);
    expect(JSON.parse(String(cli.stdout)).snapshots).toEqual(['snapshot:vol@keep1']);
    expect(await readdir(snapDir)).toEqual([]);
  });
});
