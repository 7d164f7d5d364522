"""The planner: measured costs and acceptance (profiler), the latency model, the shortest-path optimizer,
`hierspec plan` and `auto`."""
