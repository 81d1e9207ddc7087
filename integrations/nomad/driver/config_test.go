package driver

import "testing"

// A task's auth block becomes the credentials of the pull made before its
// submit; a task without one pulls nothing itself (the submit pulls with
// the node's credentials). The pull is for the task's tenant, whose
// private image it becomes.
func TestAuthBlockIsPassedThrough(t *testing.T) {
	if _, ok := taskConfigSpec.GetObject().GetAttributes()["auth"]; !ok {
		t.Fatal("the task config has no auth block")
	}
	tc := TaskConfig{Image: "registry.example/app:1"}
	if tc.pullRequest("team-a") != nil {
		t.Error("a task without an auth block makes a pull of its own")
	}
	tc.Auth = &TaskAuth{Username: "ci", Password: "pw"}
	req := tc.pullRequest("team-a")
	if req == nil || req.Ref != tc.Image || req.Tenant != "team-a" || req.Auth == nil || req.Auth.Username != "ci" || req.Auth.Password != "pw" {
		t.Fatalf("pull request %+v", req)
	}
}
