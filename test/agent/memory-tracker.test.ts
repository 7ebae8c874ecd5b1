import { describe, expect, it } from 'vitest';
import { FakeBlockDevice, MemoryTracker } from '../../agent/cbt/testing/memory-tracker.js';
import { trackerContract } from './tracker.contract.js';

const SIZE = 64 * 1024 * 1024;

trackerContract('memory', async () => {
  const dev = new FakeBlockDevice('/dev/fake0', SIZE);
  return {
    tracker: new MemoryTracker([dev]),
    device: dev.path,
    deviceSize: SIZE,
    write: async (offset, length) => dev.write(offset, length),
    discard: async (offset, length) => dev.discard(offset, length),
    another: () => new MemoryTracker([dev]),
    teardown: async () => {},
  };
});

describe('MemoryTracker specifics', () => {
  it('reports simulated lost events as invalid', async () => {
    const dev = new FakeBlockDevice('/dev/fake1', SIZE);
    const t = new MemoryTracker([dev]);
    await t.start({ device: dev.path, chunkSize: 65536, generation: 1 });
    await t.prepareSwitch();
    await t.completeSwitch();
    t.loseEvents(12);
    expect(t.validity()).toEqual({ valid: false, reason: 'kernel trace buffer lost 12 events' });
    await t.stop();
  });

  it('invalidates on a write beyond the tracked size', async () => {
    const dev = new FakeBlockDevice('/dev/fake3', SIZE);
    const t = new MemoryTracker([dev]);
    await t.start({ device: dev.path, chunkSize: 65536, generation: 1 });
    await t.prepareSwitch();
    await t.completeSwitch();
    dev.write(SIZE - 512, 1024);
    expect(t.validity()).toEqual({
      valid: false,
      reason: `write at byte ${SIZE - 512} + 1024 is beyond the tracked size ${SIZE}`,
    });
    const g = (await t.stop()).bitmap;
    expect([...g.indexes()]).toEqual([SIZE / 65536 - 1]);
  });

  it('does not see writes after stop, but the device counters do', async () => {
    const dev = new FakeBlockDevice('/dev/fake2', SIZE);
    const t = new MemoryTracker([dev]);
    await t.start({ device: dev.path, chunkSize: 65536, generation: 1 });
    const cp = await t.stop();
    dev.write(0, 4096);
    expect(dev.counters.writeIos).toBe(cp.counters.writeIos + 1);
    expect(cp.bitmap.count()).toBe(0);
  });

  it('fails to start on an unknown device', async () => {
    await expect(new MemoryTracker([]).start({ device: '/dev/nope', chunkSize: 65536, generation: 1 })).rejects.toThrow(
      /no such device/,
    );
  });
});
