"""A scripted PushT expert: sampling-based push planning on the simulator itself.

No demonstrations are downloaded: :func:`generate_demos` runs this expert in gym-pusht's
``PushTEnv`` (``obs_type="state"``) and records its observations and actions.

The expert repeats one *push*:

1. **Plan.** From the current block pose it tries candidate pushes on a second copy of the
   simulator (same physics, the block and the agent set to the current poses): a contact point on
   one of the T's faces (14 points), a direction (the inward normal, or 30 degrees to either side)
   and up to ``PUSH_STEPS`` control steps of a straight push at a speed that shrinks as the block
   nears the goal. Each prefix of each push is scored by the drop of the *keypoint cost* (mean
   distance of the T's 8 corners to the goal's corners, in pixels) per control step spent,
   travel to the contact point included. The best push is taken, or one drawn among those within
   ``TIE_TOLERANCE`` of the best (pushing sides that work about equally well both appear: the
   demonstrations are multimodal).
2. **Travel.** The agent follows the T's convex hull inflated by the agent's radius and a margin
   (a shapely buffer) to the pre-contact point, the shorter way round, or either way when the two
   are about as long (again a random choice), by pure pursuit (a target ``LOOKAHEAD`` pixels
   ahead along the path).
3. **Push.** It settles at the pre-contact point, then pushes as simulated, then plans again.

Episodes end at success (coverage > 0.95, gym-pusht's rule) or after ``MAX_STEPS`` (300, the
environment's own limit).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from . import pusht as P

# --------------------------------------------------------------------------------------------
# the T in its body frame (gym-pusht's add_tee with scale 30: bar y in [0, 30], stem y in
# [30, 120]) and the goal
# --------------------------------------------------------------------------------------------
KEYPOINTS = np.array(
    [[-60, 30], [60, 30], [60, 0], [-60, 0], [-15, 30], [-15, 120], [15, 120], [15, 30]],
    dtype=np.float64,
)
HULL = [(-60.0, 0.0), (60.0, 0.0), (60.0, 30.0), (15.0, 120.0), (-15.0, 120.0), (-60.0, 30.0)]
AGENT_RADIUS = 15.0
# (point on a face, outward normal), body frame
CONTACTS = (
    [((x, 0.0), (0.0, -1.0)) for x in (-50.0, -25.0, 0.0, 25.0, 50.0)]  # bar, long side
    + [((60.0, 15.0), (1.0, 0.0)), ((-60.0, 15.0), (-1.0, 0.0))]  # bar ends
    + [((40.0, 30.0), (0.0, 1.0)), ((-40.0, 30.0), (0.0, 1.0))]  # bar, under the arms
    + [((15.0, y), (1.0, 0.0)) for y in (60.0, 100.0)]  # stem sides
    + [((-15.0, y), (-1.0, 0.0)) for y in (60.0, 100.0)]
    + [((0.0, 120.0), (0.0, 1.0))]  # stem end
)
DIRECTIONS = (0.0, math.radians(30.0), -math.radians(30.0))
PUSH_STEPS = 8
MIN_PUSH_STEPS = 2
MAX_STEPS = 300
CLEARANCE = 1.5  # pre-contact gap between the agent's circle and the face
HULL_MARGIN = AGENT_RADIUS + 12.0  # travel path: hull buffered by this
LOOKAHEAD = 30.0  # pure pursuit: px ahead along the path (about 15 px per step at gym-pusht's PD)
TRAVEL_SPEED = 15.0  # px per control step, for scoring travel time
TIE_TOLERANCE = 0.85  # pushes scoring >= this fraction of the best are drawn from uniformly
ARENA = (12.0, 500.0)


def rot(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


def keypoints_world(pose) -> np.ndarray:
    x, y, th = pose
    return KEYPOINTS @ rot(th).T + np.array([x, y])


_GOAL_KP = keypoints_world(P.GOAL_POSE)


def keypoint_cost(pose) -> float:
    """Mean distance (px) of the T's 8 corners at ``pose`` = (x, y, angle) to the goal's."""
    return float(np.linalg.norm(keypoints_world(pose) - _GOAL_KP, axis=1).mean())


def block_pose(env) -> tuple[float, float, float]:
    b = env.block
    return (float(b.position.x), float(b.position.y), float(b.angle))


# --------------------------------------------------------------------------------------------
# simulation helpers (gym-pusht's own physics, without its per-step coverage computation)
# --------------------------------------------------------------------------------------------
def physics_step(env, action) -> None:
    """One control step of ``env`` towards ``action``: gym-pusht's PD loop, no reward/obs."""
    from pymunk.vec2d import Vec2d

    n = int(1 / (env.dt * env.control_hz))
    target = Vec2d(float(action[0]), float(action[1]))
    for _ in range(n):
        acc = env.k_p * (target - env.agent.position) + env.k_v * (Vec2d(0, 0) - env.agent.velocity)
        env.agent.velocity += acc * env.dt
        env.space.step(env.dt)


def set_sim_state(sim, agent_xy, pose) -> None:
    sim.agent.position = (float(agent_xy[0]), float(agent_xy[1]))
    sim.agent.velocity = (0.0, 0.0)
    sim.block.position = (float(pose[0]), float(pose[1]))
    sim.block.angle = float(pose[2])
    sim.block.velocity = (0.0, 0.0)
    sim.block.angular_velocity = 0.0


@dataclass
class Push:
    start: np.ndarray  # pre-contact agent position (world)
    direction: np.ndarray  # unit push direction (world)
    speed: float  # px per control step
    steps: int
    score: float
    gain: float  # keypoint-cost drop in simulation


@dataclass
class Episode:
    seed: int
    obs: np.ndarray  # [T, 5] (gym-pusht's state observation before each action)
    actions: np.ndarray  # [T, 2]
    success: bool
    coverage: float  # final coverage
    pushes: list = field(default_factory=list)  # which contact index each push used


class PushExpert:
    """The planner; ``sim`` is a private PushTEnv used for lookahead."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.sim = P.make_env()
        self.sim.reset(seed=0)

    # ---------------------------------------------------------------- planning
    def plan(self, agent_xy: np.ndarray, pose, stuck: int = 0) -> tuple[Push, int]:
        cost0 = keypoint_cost(pose)
        speed = float(np.clip(0.3 * cost0, 3.0, 12.0))
        R, p = rot(pose[2]), np.array(pose[:2])
        cands = []
        for ci, (pt, nrm) in enumerate(CONTACTS):
            n_w = R @ np.array(nrm)
            start = R @ np.array(pt) + p + n_w * (AGENT_RADIUS + CLEARANCE)
            if not (ARENA[0] <= start[0] <= ARENA[1] and ARENA[0] <= start[1] <= ARENA[1]):
                continue
            travel = self.path_length_estimate(agent_xy, start, pose) / TRAVEL_SPEED + 2.0
            for ang in DIRECTIONS:
                d = rot(ang) @ (-n_w)
                costs = self.rollout(start, d, speed, pose)
                for k in range(MIN_PUSH_STEPS, PUSH_STEPS + 1):
                    gain = cost0 - costs[k - 1]
                    score = gain / (travel + k)
                    cands.append((score, gain, ci, start, d, k))
        cands.sort(key=lambda c: -c[0])
        best = cands[0][0]
        if best > 0 and stuck < 2:
            pool = [c for c in cands if c[0] >= TIE_TOLERANCE * best]
            # one candidate per contact point, so that near-identical prefixes do not crowd out
            # the other pushing sides
            seen, uniq = set(), []
            for c in pool:
                if c[2] not in seen:
                    seen.add(c[2])
                    uniq.append(c)
            pick = uniq[int(self.rng.integers(len(uniq)))]
        else:  # nothing helps from here: a random push among the top few (to get unstuck)
            pool = [c for c in cands if c[1] > 0] or cands
            pick = pool[int(self.rng.integers(min(10, len(pool))))]
        score, gain, ci, start, d, k = pick
        return Push(start, d, speed, k, score, gain), ci

    def rollout(self, start, d, speed, pose) -> list[float]:
        sim = self.sim
        set_sim_state(sim, start, pose)
        out = []
        for k in range(1, PUSH_STEPS + 1):
            physics_step(sim, start + d * speed * k)
            out.append(keypoint_cost(block_pose(sim)))
        return out

    @staticmethod
    def hull_ring(pose):
        from shapely.geometry import Polygon

        R, p = rot(pose[2]), np.array(pose[:2])
        pts = np.array(HULL) @ R.T + p
        return Polygon(pts).buffer(HULL_MARGIN, quad_segs=4).exterior

    def path_length_estimate(self, a, b, pose) -> float:
        # cheap: straight distance, plus a detour when the segment passes near the block
        d = float(np.linalg.norm(b - a))
        c = np.array(pose[:2]) + rot(pose[2]) @ np.array([0.0, 45.0])
        ab = b - a
        t = float(np.clip(np.dot(c - a, ab) / max(np.dot(ab, ab), 1e-9), 0.0, 1.0))
        miss = float(np.linalg.norm(a + t * ab - c))
        return d + max(0.0, 90.0 - miss) * 1.5

    def travel_path(self, agent_xy, start, pose) -> np.ndarray:
        """Waypoints from the agent to ``start`` around the block (the hull's buffered ring)."""
        from shapely.geometry import Point

        ring = self.hull_ring(pose)
        L = ring.length
        a = ring.project(Point(*agent_xy))
        b = ring.project(Point(*start))
        fwd = (b - a) % L
        bwd = L - fwd
        if min(fwd, bwd) < 1e-6:
            pts = [agent_xy, start]
            return np.array(pts)
        if abs(fwd - bwd) < 0.25 * L:
            go_fwd = bool(self.rng.integers(2))  # about as long either way: both appear
        else:
            go_fwd = fwd < bwd
        length = fwd if go_fwd else bwd
        n = max(2, int(length / 8.0))
        s = np.linspace(0.0, length, n)
        arc = [(a + (si if go_fwd else -si)) % L for si in s]
        pts = [np.asarray(agent_xy, dtype=np.float64)]
        pts += [np.array(ring.interpolate(x).coords[0]) for x in arc]
        pts.append(np.asarray(start, dtype=np.float64))
        return np.clip(np.array(pts), 0.0, 512.0)


def _pursuit_target(path: np.ndarray, cum: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, bool]:
    """The point LOOKAHEAD px along ``path`` beyond the agent's projection on it; and whether
    that point is the path's end."""
    best_s, best_d = 0.0, float("inf")
    for i in range(len(path) - 1):
        a, b = path[i], path[i + 1]
        ab = b - a
        ll = float(np.dot(ab, ab))
        t = 0.0 if ll < 1e-12 else float(np.clip(np.dot(pos - a, ab) / ll, 0.0, 1.0))
        dist = float(np.linalg.norm(a + t * ab - pos))
        if dist < best_d:
            best_d, best_s = dist, cum[i] + t * math.sqrt(ll)
    s = best_s + LOOKAHEAD
    if s >= cum[-1]:
        return path[-1].copy(), True
    i = int(np.searchsorted(cum, s, side="right") - 1)
    seg = cum[i + 1] - cum[i]
    t = 0.0 if seg < 1e-12 else (s - cum[i]) / seg
    return path[i] + t * (path[i + 1] - path[i]), False


def run_expert_episode(seed: int, expert: PushExpert | None = None, env=None) -> Episode:
    """One demonstration from ``env.reset(seed=seed)`` (the expert's random choices are seeded
    from ``seed`` too)."""
    env = P.make_env() if env is None else env
    expert = PushExpert(np.random.default_rng(seed + 1_000_003)) if expert is None else expert
    obs, _ = env.reset(seed=seed)
    obs_l, act_l, pushes = [], [], []
    success, coverage = False, float(env._get_coverage())
    steps = 0

    def act(a) -> bool:
        nonlocal obs, success, coverage, steps
        a = np.clip(np.asarray(a, dtype=np.float64), 0.0, 512.0)
        obs_l.append(obs.copy())
        act_l.append(a.copy())
        obs, _, term, _, info = env.step(a)
        steps += 1
        success, coverage = bool(info["is_success"]), float(info["coverage"])
        return term or steps >= MAX_STEPS

    done, stuck = False, 0
    while not done:
        pose = block_pose(env)
        agent = np.array(env.agent.position)
        push, ci = expert.plan(agent, pose, stuck)
        pushes.append(ci)
        # travel (abandoned if the block gets nudged on the way: plan again)
        path = expert.travel_path(agent, push.start, pose)
        seg = np.linalg.norm(np.diff(path, axis=0), axis=1)
        cum = np.concatenate([[0.0], np.cumsum(seg)])
        moved = False
        for _ in range(60):
            pos = np.array(env.agent.position)
            target, at_end = _pursuit_target(path, cum, pos)
            if at_end and np.linalg.norm(pos - push.start) < 4.0:
                break
            done = act(target)
            if done:
                break
            now = block_pose(env)
            if np.hypot(now[0] - pose[0], now[1] - pose[1]) > 4.0 or abs(now[2] - pose[2]) > 0.05:
                moved = True
                break
        if done or moved:
            continue
        before = keypoint_cost(block_pose(env))
        for k in range(1, push.steps + 1):
            done = act(push.start + push.direction * push.speed * k)
            if done:
                break
        # a push that did not do what the simulation promised: after two, explore
        gained = before - keypoint_cost(block_pose(env))
        stuck = stuck + 1 if gained < 0.25 * push.gain else 0
    return Episode(
        seed=seed,
        obs=np.array(obs_l, dtype=np.float64).reshape(-1, 5),
        actions=np.array(act_l, dtype=np.float64).reshape(-1, 2),
        success=success,
        coverage=coverage,
        pushes=pushes,
    )


def generate_demos(
    num_episodes: int = 200, first_seed: int = 0, verbose: bool = True
) -> tuple[list[Episode], dict]:
    """``num_episodes`` expert episodes from env seeds ``first_seed, first_seed + 1, ...``;
    returns the episodes and a summary (success rate, mean final coverage, wall time)."""
    P.require_gym_pusht()
    t0 = time.perf_counter()
    env = P.make_env()
    eps = []
    for i in range(num_episodes):
        seed = first_seed + i
        ep = run_expert_episode(seed, env=env)
        eps.append(ep)
        if verbose and ((i + 1) % 20 == 0 or i + 1 == num_episodes):
            sr = np.mean([e.success for e in eps])
            print(
                f"[pusht expert] {i + 1}/{num_episodes} episodes  success {sr:.3f}  mean final "
                f"coverage {np.mean([e.coverage for e in eps]):.3f}  "
                f"{time.perf_counter() - t0:.1f}s",
                flush=True,
            )
    summary = {
        "episodes": num_episodes,
        "env_seeds": f"{first_seed}..{first_seed + num_episodes - 1}",
        "success_rate": float(np.mean([e.success for e in eps])),
        "mean_final_coverage": float(np.mean([e.coverage for e in eps])),
        "mean_episode_length": float(np.mean([len(e.actions) for e in eps])),
        "wall_time_s": round(time.perf_counter() - t0, 2),
    }
    return eps, summary
