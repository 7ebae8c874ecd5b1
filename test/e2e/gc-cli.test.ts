/**
 * Retention through the command line against a running appliance (issue 11):
 * a per-volume policy applied after every successful backup (then GC),
 * `images pin|unpin|delete`, the basis of a running job refused, `prune`,
 * `gc`, `store usage`; the images left verify clean and export
 * byte-identical. The agent is the scripted one (real protocol, real socket);
 * the CLI is the built one (dist/). Needs `npm run build`.
 */
import { readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startAppliance, type ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { applianceCmd } from '../../scripts/lab/processes.js';
import { goodChunk, makeVolume, mutateVolume, ScriptedAgent, type TestVolume } from '../../appliance/testing/scripted-agent.js';
import { TempDirs } from '../../appliance/testing/store-fixtures.js';
import { waitFor } from '../support/wait-for.js';

describe('retention commands on a running appliance', () => {
  let h: ApplianceHarness;
  let agent: ScriptedAgent;
  let v: TestVolume;
  const contents = new Map<string, Buffer>();
  const tmp = new TempDirs();

  /** One backup started by the CLI, answered by the scripted agent (incremental when a basis exists). */
  async function backup(changed?: number[], hold?: () => Promise<void>): Promise<string> {
    const cli = applianceCmd(h.dataDir, ['backup', 'db1', 'pgdata', '--json']);
    const run = await agent.next('runJob');
    const last = h.app.catalog.listImages({ volume: 'pgdata' }).at(-1);
    if (changed) v = mutateVolume(v, changed);
    if (hold) {
      // Begin, then wait (the job is running, its basis decided) before sending anything.
      await agent.begin(run.jobId, v, { mode: 2, basisImageId: last?.id ?? '' });
      await agent.next('volumeReady', run.jobId);
      await hold();
      for (const i of changed ?? []) {
        await agent.batch(run.jobId, [goodChunk(v, i)]);
        await agent.next('ack', run.jobId);
      }
      await agent.end(run.jobId, Math.ceil(v.size / v.chunkSize), v);
      const c = await agent.next('committed', run.jobId);
      await agent.result(run.jobId, true, c.imageId);
    } else {
      await agent.transfer(run.jobId, v, last && changed ? { basisImageId: last.id, changed } : {});
    }
    const r = await cli;
    expect(r.exitCode, r.stderr).toBe(0);
    contents.set(r.json.imageId, v.data);
    return r.json.imageId as string;
  }

  beforeAll(async () => {
    h = await startAppliance(['db1']);
    v = makeVolume('pgdata', 48 * 65536, 65536, [40, 41]);
    agent = await ScriptedAgent.connect(h.url);
    await agent.login('db1', h.tokens.db1!, [v]);
  });

  afterAll(async () => {
    await agent?.close();
    await h?.close();
    if (h) await rm(h.dataDir, { recursive: true, force: true }); // the offline part keeps it past close
    await tmp.cleanup();
  });

  it('applies the volume policy after each backup, protects pinned images and running bases, prunes, collects, and keeps every image restorable', async () => {
    const set = await applianceCmd(h.dataDir, ['policies', 'set', 'pgdata', '--agent', 'db1', '--keep-last', '2', '--json']);
    expect(set.exitCode, set.stderr).toBe(0);
    expect(set.json.keep.last).toBe(2);
    expect((await applianceCmd(h.dataDir, ['policies', 'show', 'pgdata', '--json'])).json).toMatchObject({ agent: 'db1', volume: 'pgdata' });

    const ids: string[] = [];
    ids.push(await backup());
    for (let n = 1; n < 4; n++) ids.push(await backup([n, n + 10, n + 20]));
    // The policy runs in the background after each backup: two images stay, and the GC after it ran.
    await waitFor('the policy to leave 2 images', () => h.app.catalog.listImages().length === 2, { timeoutMs: 30_000 });
    expect(h.app.catalog.listImages().map((i) => i.id)).toEqual(ids.slice(-2));
    await waitFor('a GC after the policy', async () => (await applianceCmd(h.dataDir, ['store', 'usage', '--json'])).json?.lastMarkAt != null, { timeoutMs: 30_000 });

    // images show: every image is a full map.
    const show = await applianceCmd(h.dataDir, ['images', 'show', ids[3]!, '--json']);
    expect(show.json).toMatchObject({ fullMap: true, pinned: false });
    expect((await applianceCmd(h.dataDir, ['images', 'show', ids[3]!])).stdout).toMatch(/deleting its basis never breaks it/);

    // A pinned image is never deleted; unpinned it is.
    expect((await applianceCmd(h.dataDir, ['images', 'pin', ids[2]!])).exitCode).toBe(0);
    const refused = await applianceCmd(h.dataDir, ['images', 'delete', ids[2]!]);
    expect(refused.exitCode).toBe(75);
    expect(refused.stderr).toMatch(/pinned/);
    expect((await applianceCmd(h.dataDir, ['images', 'unpin', ids[2]!])).exitCode).toBe(0);

    // The basis of a running job is never deleted; after the job it is (the incremental stays whole).
    await applianceCmd(h.dataDir, ['policies', 'remove', 'pgdata']);
    let during: Awaited<ReturnType<typeof applianceCmd>> | undefined;
    const id5 = await backup([5, 6], async () => {
      during = await applianceCmd(h.dataDir, ['images', 'delete', ids[3]!]);
    });
    expect(during!.exitCode).toBe(75);
    expect(during!.stderr).toMatch(/basis of running job/);
    const del = await applianceCmd(h.dataDir, ['images', 'delete', ids[3]!, '--json']);
    expect(del.exitCode, del.stderr).toBe(0);
    expect(del.json.removed).toEqual([ids[3]]);

    // prune through the appliance, then gc and usage.
    const dry = await applianceCmd(h.dataDir, ['prune', '--keep-last', '1', '--dry-run', '--json']);
    expect(dry.json.prune.removed).toEqual([ids[2]]);
    expect(h.app.catalog.listImages()).toHaveLength(2);
    const pr = await applianceCmd(h.dataDir, ['prune', '--keep-last', '1', '--json']);
    expect(pr.exitCode, pr.stderr).toBe(0);
    expect(pr.json.prune.removed).toEqual([ids[2]]);
    expect(pr.json.gc).toMatchObject({ dryRun: false, images: 1 }); // a GC follows a prune that removed something
    const gc = await applianceCmd(h.dataDir, ['gc', '--json']);
    expect(gc.exitCode, gc.stderr).toBe(0);
    expect(gc.json.packsDeleted + gc.json.packsRewritten).toBe(0); // the GC after the prune left nothing under the threshold
    const usage = (await applianceCmd(h.dataDir, ['store', 'usage', '--json'])).json;
    expect(usage).toMatchObject({ images: 1, reclaimableBytes: gc.json.deadBytesAfter, logicalBytes: v.size });
    expect(usage.volumes[0]).toMatchObject({ agent: 'db1', volume: 'pgdata', images: 1 });
    expect(usage.physicalBytes).toBeGreaterThan(0);

    // What is left verifies and exports byte-identical (its basis is long gone).
    expect(h.app.catalog.listImages().map((i) => i.id)).toEqual([id5]);
    const ver = await applianceCmd(h.dataDir, ['verify', '--json']);
    expect(ver.exitCode, ver.stdout).toBe(0);
    const out = join(await tmp.make('blocksnap-gc-cli-'), `${id5}.raw`);
    const ex = await applianceCmd(h.dataDir, ['export', id5, '--to', out]);
    expect(ex.exitCode, ex.stderr).toBe(0);
    expect((await readFile(out)).equals(contents.get(id5)!)).toBe(true);

    // With the appliance stopped the CLI does it itself, under the data directory's lock.
    await agent.close();
    await h.close({ keepData: true });
    const off = await applianceCmd(h.dataDir, ['gc', '--json']);
    expect(off.exitCode, off.stderr).toBe(0);
    expect(off.json).toMatchObject({ images: 1, dryRun: false });
    const offPrune = await applianceCmd(h.dataDir, ['prune', '--keep-last', '1', '--json']);
    expect(offPrune.exitCode, offPrune.stderr).toBe(0);
    expect(offPrune.json.prune.removed).toEqual([]);
    expect((await applianceCmd(h.dataDir, ['store', 'usage', '--json'])).json).toMatchObject({ images: 1 });
    expect((await applianceCmd(h.dataDir, ['verify', id5])).exitCode).toBe(0);
  });
});
