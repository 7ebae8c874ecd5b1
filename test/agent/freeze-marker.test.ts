/**
 * frozenDuring / thawStaleFreezes (agent/snapshot/freeze-marker.ts) on a
 * real ext4 volume (loop device): the freeze is under a durable marker,
 * thawed whatever the snapshot step does, and a marker a killed process left
 * is consumed by the next start (thaw + remove). The LVM providers use it for
 * a filesystem stacked over the LV (its kill-9 case runs in the LVM guest:
 * test/lvm/guest/bad-input.guest.ts); reflink has its own tests.
 */
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, expect, it } from 'vitest';
import { freezeMarkerPath, frozenDuring, onAnotherDevice, thawStaleFreezes, writeFreezeMarker } from '../../agent/snapshot/freeze-marker.js';
import { findMount } from '../../agent/snapshot/fsfreeze.js';
import { freezeFilesystem, thawFilesystem } from '../../agent/snapshot/fsfreeze.js';
import { isBlocksnapError } from '../../proto/errors.js';
import { createVolumeLab, type VolumeLab } from '../../scripts/lab/volume-lab.js';
import { startWriteProbe, writeOutcome } from '../support/write-probe.js';

let lab: VolumeLab;
let tmp: string;
let stateDir: string;
let seq = 0;
const probe = () => startWriteProbe(path.join(lab.volumeMount, `probe-${seq++}`));

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'bsn-freeze-marker-'));
  stateDir = path.join(tmp, 'state');
  lab = await createVolumeLab({ poolSize: 320 << 20, volumeSize: 32 << 20, ledgerDir: path.join(tmp, 'ledgers') });
});
afterEach(async () => {
  // A failed assertion must never leave the machine with a frozen filesystem.
  if (lab) await thawFilesystem(lab.volumeMount, { ignoreNotFrozen: true });
  await rm(stateDir, { recursive: true, force: true });
});
afterAll(async () => {
  await lab?.destroy();
  await rm(tmp, { recursive: true, force: true });
});

it('runs the step frozen with the marker on disk; after it the filesystem takes writes and the marker is gone', async () => {
  const marker = freezeMarkerPath(stateDir, lab.volume.name);
  const seen = await frozenDuring(stateDir, lab.volume, async () => {
    const w = probe();
    const during = await writeOutcome(w);
    return { during, marker: JSON.parse(await readFile(marker, 'utf8')) as Record<string, unknown>, after: w };
  });
  expect(seen.during).toBe('blocked');
  expect(seen.marker).toMatchObject({ format: 'blocksnap-freeze-marker', version: 1, volume: lab.volume.name, mountpoint: lab.volume.mountpoint, pid: process.pid });
  expect(await seen.after.done).toBe(true); // the write that waited went through at the thaw
  expect(existsSync(marker)).toBe(false);
  expect(await writeOutcome(probe())).toBe('done');
});

it('a failing step: the filesystem is thawed, the marker removed, the step\'s error comes back', async () => {
  const err = await frozenDuring(stateDir, lab.volume, () => Promise.reject(new Error('lvcreate failed'))).then(() => null, (e: unknown) => e);
  expect((err as Error).message).toBe('lvcreate failed');
  expect(await writeOutcome(probe())).toBe('done');
  expect(existsSync(freezeMarkerPath(stateDir, lab.volume.name))).toBe(false);
});

it('a filesystem someone else froze: E_BUSY, the step does not run, their freeze stays, no marker', async () => {
  await freezeFilesystem(lab.volumeMount);
  let ran = false;
  const err = await frozenDuring(stateDir, lab.volume, async () => { ran = true; }).then(() => null, (e: unknown) => e);
  expect(isBlocksnapError(err, 'E_BUSY'), String(err)).toBe(true);
  expect(ran).toBe(false);
  expect(await writeOutcome(probe())).toBe('blocked');
  expect(existsSync(freezeMarkerPath(stateDir, lab.volume.name))).toBe(false);
  expect(await thawFilesystem(lab.volumeMount)).toBe('thawed');
});

it('the next start consumes a killed process\'s marker: thaws its filesystem (if frozen) and removes it; a volume in flight is left', async () => {
  const m = { volume: lab.volume.name, mountpoint: lab.volume.mountpoint, device: lab.volume.device, snapshotTemp: null, pid: 1, createdAt: new Date().toISOString() };
  await writeFreezeMarker(stateDir, m);
  await freezeFilesystem(lab.volumeMount); // what the killed process left
  expect(await thawStaleFreezes(stateDir, new Set([lab.volume.name]))).toEqual({ released: [], errors: [] });
  expect(await writeOutcome(probe())).toBe('blocked');
  expect(await thawStaleFreezes(stateDir, new Set())).toEqual({ released: [`thawed:${lab.volume.mountpoint}`, `marker:${lab.volume.name}`], errors: [] });
  expect(await writeOutcome(probe())).toBe('done');
  // Killed before its freeze began (marker only), and a marker whose mount is gone: removed, nothing thawed.
  await writeFreezeMarker(stateDir, m);
  await writeFreezeMarker(stateDir, { ...m, volume: 'gone', mountpoint: path.join(tmp, 'no-such-mount') });
  expect((await thawStaleFreezes(stateDir, new Set())).released.sort()).toEqual(['marker:gone', `marker:${lab.volume.name}`].sort());
  expect(await thawStaleFreezes(stateDir, new Set())).toEqual({ released: [], errors: [] });
});

it('a marker naming another device than the one mounted there now: that filesystem\'s freeze is not undone, the marker goes', async () => {
  // The lab's pool is another block device: a later mount at the marker's mountpoint that is not the volume it froze.
  await writeFreezeMarker(stateDir, { volume: lab.volume.name, mountpoint: lab.volume.mountpoint, device: lab.poolDevice, snapshotTemp: null });
  await freezeFilesystem(lab.volumeMount); // someone else's freeze
  const outcomes: string[] = [];
  expect(await thawStaleFreezes(stateDir, new Set(), async (_m, o) => { outcomes.push(o); })).toEqual({ released: [`marker:${lab.volume.name}`], errors: [] });
  expect(outcomes).toEqual(['another-device']);
  expect(await writeOutcome(probe())).toBe('blocked');
  expect(existsSync(freezeMarkerPath(stateDir, lab.volume.name))).toBe(false);
  expect(await thawFilesystem(lab.volumeMount)).toBe('thawed');
});

it('the device comparison: the same device, another one, and what cannot be compared (counted as ours)', async () => {
  const mounted = (await findMount(lab.volumeMount))!.device; // mountinfo's major:minor of the lab volume
  expect(await onAnotherDevice({ device: lab.volume.device }, mounted)).toBe(false);
  expect(await onAnotherDevice({ device: lab.poolDevice }, mounted)).toBe(true);
  // btrfs (not installed here) reports an anonymous device number, major 0, for every mount: not comparable.
  expect(await onAnotherDevice({ device: lab.poolDevice }, '0:45')).toBe(false);
  expect(await onAnotherDevice({}, mounted)).toBe(false);
  expect(await onAnotherDevice({ device: path.join(tmp, 'no-such-device') }, mounted)).toBe(false);
  expect(await onAnotherDevice({ device: '/dev/null' }, mounted)).toBe(false); // a character device
});
