/**
 * The capture window (agent/capture.ts) with injected ports: the fake
 * snapshot provider, the fake quiescer and the memory tracker. What it
 * holds is released whatever fails, and it never quiesces a database it was
 * not given a quiescer for.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { capture } from '../../agent/capture.js';
import { MemoryTracker } from '../../agent/cbt/testing/memory-tracker.js';
import { VolumeTracking } from '../../agent/cbt/volume-tracking.js';
import type { PostgresConfig } from '../../agent/config.js';
import { FakeDatabase, FakeQuiescer } from '../../agent/pg/testing/fake-quiescer.js';
import type { SnapshotProvider } from '../../agent/snapshot/snapshot-provider.js';
import { FakeSnapshotProvider, FakeVolume } from '../../agent/snapshot/testing/fake-snapshot-provider.js';
import { BlocksnapError, isBlocksnapError } from '../../proto/errors.js';
import { createLogger } from '../../proto/shared/log.js';

const log = createLogger('test-capture', 'silent');
const POSTGRES: PostgresConfig = {
  host: '127.0.0.1', port: 1, user: 'postgres', database: 'postgres', role: 'auto', fast: true, pauseTimeoutMs: 1000, watchdogSeconds: 60,
};

describe('capture with injected ports', () => {
  let dir: string;
  let volume: FakeVolume;
  let provider: FakeSnapshotProvider;
  let tracking: VolumeTracking;
  let db: FakeDatabase;

  beforeEach(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'bsn-capture-'));
    volume = new FakeVolume('cap', 4 << 20);
    provider = new FakeSnapshotProvider(path.join(dir, 'snaps'), [volume]);
    tracking = await VolumeTracking.open(volume.spec, path.join(dir, 'state'), new MemoryTracker([volume.device]), log);
    db = new FakeDatabase('standby');
  });
  afterEach(async () => {
    await tracking.close();
    await rm(dir, { recursive: true, force: true });
  });

  async function codeOf(p: Promise<unknown>): Promise<string> {
    return p.then(() => 'resolved', (e) => (isBlocksnapError(e) ? e.code : String(e)));
  }

  it('quiesces through the injected quiescer around the snapshot and returns its result; nothing stays held', async () => {
    const r = await capture({ jobId: 'j1', volume: volume.spec, provider, tracking, quiescer: () => new FakeQuiescer(db), log });
    expect(r.pg?.info.labelFile).toContain('\nLABEL: blocksnap j1\n');
    expect(r.pg).toMatchObject({ wal: [], walSegmentSize: 0 });
    expect(r.switched?.closed.generation).toBe(1);
    expect(db.held.size).toBe(0);
    expect(db.completed).toHaveLength(1);
  });

  it('a PostgreSQL server configured without a quiescer is E_INTERNAL before anything is held (was: capture built PgQuiescer itself)', async () => {
    expect(await codeOf(capture({ jobId: 'j2', volume: volume.spec, provider, tracking, postgres: POSTGRES, log }))).toBe('E_INTERNAL');
    expect(await provider.list()).toEqual([]);
    expect(tracking.tracker.generation).toBe(1);
  });

  it('a failed quiesce takes no snapshot and switches no generation', async () => {
    db.failNextQuiesce = new BlocksnapError('E_PG', 'injected');
    expect(await codeOf(capture({ jobId: 'j3', volume: volume.spec, provider, tracking, quiescer: () => new FakeQuiescer(db), log }))).toBe('E_PG');
    expect(await provider.list()).toEqual([]);
    expect(tracking.tracker.generation).toBe(1);
    expect(tracking.tracker.phase).toBe('tracking');
  });

  it('a failed snapshot releases the quiesce and keeps every change in the open generation', async () => {
    const failing: SnapshotProvider = Object.assign(Object.create(provider) as FakeSnapshotProvider, {
      create: async () => {
        throw new BlocksnapError('E_SNAPSHOT', 'injected');
      },
    });
    volume.write(0, Buffer.alloc(4096, 1));
    expect(await codeOf(capture({ jobId: 'j4', volume: volume.spec, provider: failing, tracking, quiescer: () => new FakeQuiescer(db), log }))).toBe('E_SNAPSHOT');
    expect(db.held.size).toBe(0);
    expect(tracking.tracker.generation).toBe(1);
    expect(tracking.tracker.phase).toBe('tracking');
  });
});
