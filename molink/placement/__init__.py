"""Where work goes in a swarm: routes over the nodes that serve layer spans, and the span a
joining node should take. Pure logic over plain data: no torch, no network."""
