/**
 * A disk filled by backups is usable again after prune + GC (issue 11): the
 * data directory on a small ext4 filesystem (a loop device): full backups of
 * incompressible volumes until one fails for lack of space (the job fails
 * cleanly and its own packs go at once, DESIGN.md §5.2), then the next one
 * fails too; after `prune --keep-last 1` and GC the space is back, the next
 * backup succeeds, and every image left verifies clean. Root only.
 */
import { execFile } from 'node:child_process';
import { statfs, writeFile, mkdir, realpath } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { verifyImage } from '../../appliance/ops/verify-image.js';
import { StoreRig, rigVolume } from '../../appliance/retention/store-rig.js';
import { TempDirs } from '../../appliance/testing/store-fixtures.js';
import { attachLoop, detachLoop } from '../../scripts/lab/loop.js';
import { Disposables } from '../support/disposables.js';
import { codeOf } from '../support/error-code.js';

const sh = promisify(execFile);
const MiB = 1 << 20;
const isRoot = process.getuid?.() === 0;

describe.skipIf(!isRoot)('a full disk after GC', () => {
  const tmp = new TempDirs();
  const d = new Disposables();
  let mnt: string;

  beforeAll(async () => {
    const dir = await tmp.make('blocksnap-gc-full-');
    const file = join(dir, 'fs.img');
    await writeFile(file, Buffer.alloc(0));
    await sh('truncate', ['-s', `${48 * MiB}`, file]);
    await sh('mkfs.ext4', ['-q', '-F', '-m', '0', '-E', 'lazy_itable_init=0,lazy_journal_init=0', file]);
    const dev = d.add('loop device', await attachLoop(file), async (dev) => detachLoop(dev, { backingFile: await realpath(file) }));
    mnt = join(dir, 'mnt');
    await mkdir(mnt);
    await sh('mount', ['-o', 'noatime', dev, mnt]);
    d.defer('mount', () => sh('umount', [mnt]));
  });

  afterAll(async () => {
    await d.dispose();
    await tmp.cleanup();
  });

  it('a backup that failed on a full disk succeeds after prune + GC', async () => {
    const rig = await StoreRig.open(join(mnt, 'data'), { targetPackSize: 2 * MiB });
    d.defer('store', () => rig.close());
    const vol = (_i: number) => rigVolume('pgdata', 8 * MiB, 64 * 1024); // random: nothing de-duplicates
    let committed = 0;
    let failure: string | undefined;
    for (let i = 0; i < 10 && !failure; i++) {
      await rig.commit(vol(i)).then(() => committed++, async (e) => (failure = await codeOf(Promise.reject(e))));
    }
    expect(failure).toBe('E_STORE_IO'); // ENOSPC
    expect(committed).toBeGreaterThanOrEqual(2);
    const free = async () => Number((await statfs(mnt)).bavail) * Number((await statfs(mnt)).bsize);
    const freeAfterFailure = await free();
    expect(freeAfterFailure).toBeLessThan(8 * MiB); // the failed job removed its packs, but old images fill the disk
    expect(await codeOf(rig.commit(vol(100)))).toBe('E_STORE_IO');

    await rig.retention.prune({ keep: { last: 1 } });
    const gc = await rig.retention.gc({});
    expect(gc.packsDeleted).toBeGreaterThan(0);
    expect(await free()).toBeGreaterThan(freeAfterFailure + (committed - 1) * 7 * MiB);

    await rig.commit(vol(200));
    expect(rig.catalog.listImages()).toHaveLength(2);
    for (const img of rig.catalog.listImages()) expect((await verifyImage(rig.store, rig.manifests, img.id, img.rootDigest)).ok).toBe(true);
  });
});
