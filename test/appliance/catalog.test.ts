import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Catalog } from '../../appliance/catalog/catalog.js';

describe('Catalog', () => {
  let dir: string;
  let cat: Catalog;
  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'bsn-cat-'));
    cat = Catalog.open(join(dir, 'catalog.sqlite'));
  });
  afterEach(() => {
    cat.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('authenticates only the right agent with the right token and stores no plain token', () => {
    const t1 = cat.addAgent('db1');
    const t2 = cat.addAgent('db2');
    expect(cat.authenticate('db1', t1)?.name).toBe('db1');
    expect(cat.authenticate('db1', t2)).toBeUndefined();
    expect(cat.authenticate('nobody', t1)).toBeUndefined();
    expect(cat.authenticate('db1', '')).toBeUndefined();
    const rotated = cat.rotateToken('db1');
    expect(cat.authenticate('db1', t1)).toBeUndefined();
    expect(cat.authenticate('db1', rotated)?.name).toBe('db1');
    expect(() => cat.addAgent('db1')).toThrow(/already exists/);
    expect(() => cat.addAgent('../etc')).toThrow(/invalid agent name/);
  });

  it('records damage: a damaged image is listed with it, is never a basis, and one known only by its damage is listed too', () => {
    cat.addAgent('db1');
    const vol = cat.upsertVolume(cat.agent('db1')!.id, 'pgdata', 1 << 30, 65536);
    const base = { agent: 'db1', volume: 'pgdata', jobId: null, basisImageId: null, volumeSize: 1 << 30, chunkSize: 65536, kind: 'full' };
    cat.insertImage({ ...base, id: 'img-1', rootDigest: 'aa', createdAt: '2026-01-01T00:00:00.000Z' });
    expect(cat.lastImage(vol.id)?.id).toBe('img-1');
    expect(cat.hasRoot('aa')).toBe(true);
    expect(cat.hasRoot('bb')).toBe(false);
    cat.recordDamage('img-1', 'pack p1 (file missing)', 'root blob aa is not in any readable pack');
    cat.recordDamage('img-1', 'pack p1 (file missing)', 'a later, less precise reason');
    expect(cat.image('img-1')?.damage).toEqual([{ object: 'pack p1 (file missing)', reason: 'root blob aa is not in any readable pack', detectedAt: expect.any(String) }]);
    expect(cat.lastImage(vol.id)).toBeUndefined(); // the next backup of the volume is a full
    cat.recordDamage('img-20260102t000000z-0000abcd', 'manifest img-20260102t000000z-0000abcd', 'unreadable');
    const all = cat.listImages();
    expect(all.map((i) => [i.id, i.damage.length])).toEqual([['img-1', 1], ['img-20260102t000000z-0000abcd', 1]]);
    expect(all[1]).toMatchObject({ kind: 'unknown', rootDigest: '', createdAt: '2026-01-02T00:00:00.000Z' });
    expect(cat.listImages({ volume: 'pgdata' }).map((i) => i.id)).toEqual(['img-1']);
  });

  it('an unreadable catalog file (half-truncated, or not a database) is E_STORE_CORRUPT naming catalog rebuild', async () => {
    cat.addAgent('db1');
    cat.close();
    const file = join(dir, 'catalog.sqlite');
    const { statSync, truncateSync, writeFileSync } = await import('node:fs');
    truncateSync(file, Math.floor(statSync(file).size / 2));
    expect(() => Catalog.open(file)).toThrow(/catalog rebuild/);
    writeFileSync(file, 'not a database at all, not even a header.........................................................');
    let err: any;
    try {
      Catalog.open(file);
    } catch (e) {
      err = e;
    }
    expect(err?.code).toBe('E_STORE_CORRUPT');
    cat = Catalog.open(join(dir, 'fresh.sqlite'));
  });

  it('keeps the last image per volume as the basis, and insertImage is idempotent', () => {
    cat.addAgent('db1');
    const a = cat.agent('db1')!;
    const vol = cat.upsertVolume(a.id, 'pgdata', 1 << 30, 65536);
    expect(cat.lastImage(vol.id)).toBeUndefined();
    const base = { agent: 'db1', volume: 'pgdata', jobId: null, basisImageId: null, volumeSize: 1 << 30, chunkSize: 65536 };
    cat.insertImage({ ...base, id: 'img-1', kind: 'full', rootDigest: 'aa', createdAt: '2026-01-01T00:00:00.000Z' });
    cat.insertImage({ ...base, id: 'img-2', kind: 'incremental', basisImageId: 'img-1', rootDigest: 'bb', createdAt: '2026-01-01T00:00:01.000Z' });
    cat.insertImage({ ...base, id: 'img-2', kind: 'incremental', basisImageId: 'img-1', rootDigest: 'bb', createdAt: '2026-01-01T00:00:01.000Z' });
    expect(cat.lastImage(vol.id)?.id).toBe('img-2');
    expect(cat.listImages({ volume: 'pgdata' }).map((i) => i.id)).toEqual(['img-1', 'img-2']);
    expect(() => cat.insertImage({ ...base, agent: 'ghost', id: 'img-3', kind: 'full', rootDigest: 'cc', createdAt: 'x' })).toThrow(/unknown agent/);
    cat.insertImage({ ...base, agent: 'ghost', id: 'img-3', kind: 'full', rootDigest: 'cc', createdAt: 'x' }, { createAgent: true });
    expect(cat.image('img-3')?.agent).toBe('ghost');
    expect(cat.authenticate('ghost', 'disabled')).toBeUndefined();
  });

  it('records job outcomes and fails jobs a dead appliance left running', () => {
    cat.addAgent('db1');
    const a = cat.agent('db1')!;
    const j1 = cat.createJob(a.id, 'pgdata', 'full');
    const j2 = cat.createJob(a.id, 'pgdata', 'incremental');
    cat.setJobState(j1.id, 'running');
    cat.finishJob(j2.id, { state: 'committed', imageId: 'img-9', stats: { chunksSent: 3 } });
    expect(cat.failInterruptedJobs()).toBe(1);
    expect(cat.job(j1.id)?.state).toBe('failed');
    expect(cat.job(j1.id)?.errorCode).toBe('E_INTERRUPTED');
    expect(cat.job(j2.id)).toMatchObject({ state: 'committed', imageId: 'img-9', stats: { chunksSent: 3 } });
  });

  it('survives reopen (migrations are not re-run)', () => {
    const t = cat.addAgent('db1');
    cat.close();
    cat = Catalog.open(join(dir, 'catalog.sqlite'));
    expect(cat.authenticate('db1', t)?.name).toBe('db1');
  });
});
