/**
 * Delay before the n-th redial (n = 0 after the first failure): exponential
 * from baseMs, capped at maxMs, with "equal jitter" — a random point in the
 * upper half of the step. The jitter keeps a fleet of agents that lost the
 * appliance at the same moment from redialling in lock-step; the lower
 * bound keeps one agent from hammering it.
 */
export function reconnectDelayMs(attempt: number, opts: { baseMs: number; maxMs: number }, random: () => number = Math.random): number {
  const step = Math.min(opts.maxMs, opts.baseMs * 2 ** Math.min(attempt, 30));
  return Math.round(step / 2 + random() * (step / 2));
}
