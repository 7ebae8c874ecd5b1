import { describe, expect, it } from 'vitest';
import { reconnectDelayMs } from '../../agent/reconnect-backoff.js';

/** The agent's redial schedule (agent/reconnect-backoff.ts): exponential, capped, jittered within bounds. */
describe('reconnect backoff', () => {
  const opts = { baseMs: 200, maxMs: 10_000 };

  it('doubles from the base up to the cap, each delay in the upper half of its step', () => {
    const steps = [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000];
    steps.forEach((step, attempt) => {
      expect(reconnectDelayMs(attempt, opts, () => 0)).toBe(step / 2);
      expect(reconnectDelayMs(attempt, opts, () => 0.999999)).toBe(Math.round(step / 2 + 0.999999 * (step / 2)));
      for (let i = 0; i < 200; i++) {
        const d = reconnectDelayMs(attempt, opts);
        expect(d).toBeGreaterThanOrEqual(step / 2);
        expect(d).toBeLessThanOrEqual(step);
      }
    });
    expect(reconnectDelayMs(10_000, opts)).toBeLessThanOrEqual(10_000); // no overflow after a long outage
  });

  it('is jittered: agents that lost the appliance together do not redial together', () => {
    const delays = new Set(Array.from({ length: 50 }, () => reconnectDelayMs(6, opts)));
    expect(delays.size).toBeGreaterThan(10);
  });
});
