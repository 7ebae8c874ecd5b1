import { spawn } from 'node:child_process';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { pino } from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { thawFilesystem } from '../../agent/snapshot/fsfreeze.js';
import { ReflinkSnapshotProvider, snapshotDirOf } from '../../agent/snapshot/reflink-snapshot-provider.js';
import { startWriteProbe, writeOutcome } from '../support/write-probe.js';
import { createVolumeLab, type VolumeLab } from '../../scripts/lab/volume-lab.js';
import { isBlocksnapError } from '../../proto/errors.js';

/**
 * `createGroup` (a consistency group's snapshot, DESIGN.md §4.4) on two real
 * volumes in two reflink pools: every member is frozen at the same time
 * (a write to either blocks while the other is being cloned), a failure
 * inside the window thaws both and leaves no clone and no marker.
 */
const MiB = 1024 * 1024;
const logger = pino({ level: 'silent' });
let a: VolumeLab;
let b: VolumeLab;
let tmp: string;
let stateDir: string;
let probe = 0;

/** True if a write to `dir` completes within `ms` (false while its filesystem is frozen). */
function writesWithin(dir: string, ms: number): Promise<boolean> {
  const child = spawn('sh', ['-c', 'printf probe > "$1"', 'sh', path.join(dir, `probe-${probe++}`)], { stdio: 'ignore' });
  const done = new Promise<boolean>((resolve) => child.on('exit', (code) => resolve(code === 0)));
  return Promise.race([done, new Promise<boolean>((r) => setTimeout(() => r(false), ms))]);
}

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'bsn-reflink-group-'));
  stateDir = path.join(tmp, 'state');
  a = await createVolumeLab({ poolSize: 400 * MiB, volumeSize: 64 * MiB, name: 'gdata', ledgerDir: path.join(tmp, 'ledgers') });
  b = await createVolumeLab({ poolSize: 400 * MiB, volumeSize: 64 * MiB, name: 'gwal', ledgerDir: path.join(tmp, 'ledgers') });
});

afterEach(async () => {
  // A failed assertion must never leave the shared machine with a frozen filesystem.
  for (const lab of [a, b]) if (lab) await thawFilesystem(lab.volumeMount, { ignoreNotFrozen: true });
});

afterAll(async () => {
  await b?.destroy();
  await a?.destroy();
  await rm(tmp, { recursive: true, force: true });
});

describe('ReflinkSnapshotProvider.createGroup', () => {
  it('freezes every member at once, clones each, thaws, and publishes one snapshot per member', async () => {
    const provider = new ReflinkSnapshotProvider({ stateDir, logger, volumes: [a.volume, b.volume] });
    await writeFile(path.join(a.volumeMount, 'x'), 'a');
    const seen: Array<{ volume: string; aWrites: boolean; bWrites: boolean }> = [];
    const snaps = await provider.createGroup([a.volume, b.volume], 't1', {
      whileFrozen: async (v) => {
        const aw = await writeOutcome(startWriteProbe(path.join(a.volumeMount, `probe-${probe++}`)));
        const bw = await writeOutcome(startWriteProbe(path.join(b.volumeMount, `probe-${probe++}`)));
        seen.push({ volume: v.name, aWrites: aw !== 'blocked', bWrites: bw !== 'blocked' });
      },
    });
    expect(seen).toEqual([
      { volume: 'gdata', aWrites: false, bWrites: false },
      { volume: 'gwal', aWrites: false, bWrites: false },
    ]);
    expect(snaps.map((s) => s.id)).toEqual(['gdata@t1', 'gwal@t1']);
    expect(snaps[0]!.freezeSeconds).toBe(snaps[1]!.freezeSeconds);
    expect(await writesWithin(a.volumeMount, 2000)).toBe(true);
    expect(await writesWithin(b.volumeMount, 2000)).toBe(true);
    expect(await readdir(stateDir).then((n) => n.filter((x) => x.startsWith('freeze-')))).toEqual([]);
    for (const s of snaps) await provider.remove(s);
    expect(await readdir(snapshotDirOf(a.volume.image!))).toEqual([]);
    expect(await readdir(snapshotDirOf(b.volume.image!))).toEqual([]);
  });

  it('thaws every member and leaves nothing when the window fails at the second member', async () => {
    const provider = new ReflinkSnapshotProvider({ stateDir, logger, volumes: [a.volume, b.volume] });
    const err = await provider.createGroup([a.volume, b.volume], 't2', {
      whileFrozen: async (v) => {
        if (v.name === 'gwal') throw new Error('injected failure inside the freeze window');
      },
    }).then(() => null, (e: unknown) => e);
    expect(isBlocksnapError(err, 'E_SNAPSHOT')).toBe(true);
    expect(await writesWithin(a.volumeMount, 2000)).toBe(true);
    expect(await writesWithin(b.volumeMount, 2000)).toBe(true);
    expect(await readdir(stateDir).then((n) => n.filter((x) => x.startsWith('freeze-')))).toEqual([]);
    expect(await readdir(snapshotDirOf(a.volume.image!))).toEqual([]);
    expect(await readdir(snapshotDirOf(b.volume.image!))).toEqual([]);
  });

  it('refuses the same filesystem twice in a group (it would wait on its own freeze)', async () => {
    const provider = new ReflinkSnapshotProvider({ stateDir, logger });
    const err = await provider.createGroup([a.volume, { ...b.volume, mountpoint: a.volume.mountpoint }], 't3').then(() => null, (e: unknown) => e);
    expect(isBlocksnapError(err, 'E_CONFIG')).toBe(true);
  });
});
