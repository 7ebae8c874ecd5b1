import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { readBitmapFile } from '../../agent/cbt/bitmap-file.js';
import { FakeBlockDevice, MemoryTracker } from '../../agent/cbt/testing/memory-tracker.js';
import { TrackerState } from '../../agent/cbt/tracker-state.js';

const SIZE = 16 * 1024 * 1024;
const C = 65536;

let dir: string;
let file: string;
let dev: FakeBlockDevice;
const open: TrackerState[] = [];

beforeEach(() => {
  dir = mkdtempSync(path.join(tmpdir(), 'blocksnap-trackerstate-'));
  file = path.join(dir, 'vol.cbt');
  dev = new FakeBlockDevice('/dev/fake0', SIZE);
});
afterEach(async () => {
  for (const s of open.splice(0)) {
    if (s.tracker.phase !== 'stopped') await s.tracker.stop();
  }
  rmSync(dir, { recursive: true, force: true });
});

async function openState(expectedGeneration: number, saveIntervalMs = 0): Promise<TrackerState> {
  const s = await TrackerState.open({
    file,
    tracker: new MemoryTracker([dev]),
    device: dev.path,
    chunkSize: C,
    expectedGeneration,
    saveIntervalMs,
  });
  open.push(s);
  return s;
}

/** A clean run: start, take a snapshot switch, write chunk 5, stop cleanly. Returns the open generation. */
async function cleanRun(): Promise<number> {
  const s = await openState(1);
  await s.tracker.prepareSwitch();
  await s.tracker.completeSwitch();
  dev.write(5 * C, 4096);
  const cp = await s.close();
  expect(cp.validity).toEqual({ valid: true });
  return cp.generation;
}

/** A snapshot switch (the invalid generation closes), then a clean stop. */
async function switchAndClose(s: TrackerState): Promise<number> {
  await s.tracker.prepareSwitch();
  await s.tracker.completeSwitch();
  return (await s.close()).generation;
}

function reasonOf(s: TrackerState): string {
  return s.resume.valid ? '(valid)' : s.resume.reason;
}

describe('TrackerState', () => {
  it('first start: invalid "no saved bitmap", and the file is immediately written not clean', async () => {
    const s = await openState(1);
    expect(reasonOf(s)).toMatch(/^no saved bitmap/);
    const f = await readBitmapFile(file);
    expect(f!.clean).toBe(false);
    expect(f!.generation).toBe(1);
  });

  it('clean stop then restart with the expected generation: valid, bits carried over', async () => {
    const gen = await cleanRun();
    const f = await readBitmapFile(file);
    expect(f!.clean).toBe(true);
    expect(f!.generation).toBe(2);
    const s = await openState(gen);
    expect(s.resume).toEqual({ valid: true });
    dev.write(6 * C, 512);
    await s.tracker.prepareSwitch();
    const g = await s.tracker.completeSwitch();
    expect(g.validity).toEqual({ valid: true });
    expect([...g.bitmap.indexes()]).toEqual([5, 6]);
    // Running again has made the file not clean: a crash now would not be believed.
    expect((await readBitmapFile(file))!.clean).toBe(false);
  });

  it('crash (no clean stop) → invalid, even after an earlier clean stop', async () => {
    const gen = await cleanRun();
    const s = await openState(gen);
    expect(s.resume.valid).toBe(true);
    dev.write(7 * C, 512);
    await s.save(); // periodic save, then "kill -9": no close()
    await s.tracker.stop();
    const after = await openState(gen);
    expect(reasonOf(after)).toMatch(/^agent did not shut down cleanly/);
  });

  it('generation gap → invalid', async () => {
    const gen = await cleanRun();
    const s = await openState(gen + 1);
    expect(reasonOf(s)).toBe(`generation gap: saved generation ${gen}, expected ${gen + 1}`);
  });

  it('device resized → invalid', async () => {
    const gen = await cleanRun();
    dev.identity = { ...dev.identity, size: SIZE * 2 };
    const s = await openState(gen);
    expect(reasonOf(s)).toBe(`device size changed: saved ${SIZE} bytes, now ${SIZE * 2} bytes`);
  });

  it('another device identity (re-attached, other minor) → invalid', async () => {
    const gen = await cleanRun();
    dev.reattach();
    const s = await openState(gen);
    expect(reasonOf(s)).toMatch(/^device identity changed: saved 7:99 diskseq 1, now 7:99 diskseq 2/);
    const gen2 = await switchAndClose(s);
    dev.identity = { ...dev.identity, minor: 100 };
    expect(reasonOf(await openState(gen2))).toMatch(/^device identity changed: saved 7:99 .* now 7:100/);
  });

  it('a write while the agent was down → invalid', async () => {
    const gen = await cleanRun();
    dev.write(9 * C, 4096); // nobody tracking
    const s = await openState(gen);
    expect(reasonOf(s)).toBe('device written while untracked: 1 write and 0 discard I/Os since the clean shutdown');
    dev.discard(0, C);
    const gen2 = await switchAndClose(s);
    dev.discard(0, C);
    expect(reasonOf(await openState(gen2))).toMatch(/0 write and 1 discard/);
  });

  it('a cache flush while the agent was down (a write I/O of 0 sectors: any `sync` on the host) → still valid', async () => {
    const gen = await cleanRun();
    dev.counters.writeIos++;
    const s = await openState(gen);
    expect(s.resume).toEqual({ valid: true });
    await s.close();
  });

  it('writes in flight at start, or no I/O accounting → invalid', async () => {
    const gen = await cleanRun();
    dev.counters.writesInFlight = 2;
    const s = await openState(gen);
    expect(reasonOf(s)).toBe('2 writes were in flight when tracking started');
    dev.counters.writesInFlight = 0;
    const gen2 = await switchAndClose(s);
    dev.counters.available = false;
    expect(reasonOf(await openState(gen2))).toMatch(/^device I\/O statistics unavailable/);
  });

  it('tracking already invalid at shutdown → invalid at restart with the original reason', async () => {
    const s = await openState(1);
    await s.tracker.prepareSwitch();
    await s.tracker.completeSwitch();
    s.tracker.invalidate('kernel trace buffer lost 3 events');
    const gen = (await s.close()).generation;
    expect(reasonOf(await openState(gen))).toBe(
      'tracking was already invalid at shutdown: kernel trace buffer lost 3 events',
    );
  });

  it('corrupt file → invalid with the decoding reason', async () => {
    const gen = await cleanRun();
    const bytes = readFileSync(file);
    bytes[bytes.length - 1] ^= 0x80;
    writeFileSync(file, bytes);
    expect(reasonOf(await openState(gen))).toBe('saved bitmap unusable: bitmap file: checksum mismatch');
  });

  it('saves periodically while running', async () => {
    const s = await openState(1, 20);
    await s.tracker.prepareSwitch();
    await s.tracker.completeSwitch();
    dev.write(11 * C, 512);
    const deadline = Date.now() + 5000;
    let f = await readBitmapFile(file);
    while (Date.now() < deadline && !(f && f.generation === 2 && f.bitmap.has(11))) {
      await new Promise((r) => setTimeout(r, 20));
      f = await readBitmapFile(file);
    }
    expect(f!.generation).toBe(2);
    expect([...f!.bitmap.indexes()]).toEqual([11]);
    expect(f!.clean).toBe(false);
    await s.close();
    expect((await readBitmapFile(file))!.clean).toBe(true);
  });
});
